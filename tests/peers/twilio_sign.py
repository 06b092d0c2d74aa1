#!/usr/bin/env python3
"""Signs webhooks with Twilio's own RequestValidator (PyPI `twilio`), for smsgw's tests.

    twilio_sign.py sign  < {"token": ..., "url": ..., "params": [[name, value], ...]}
        prints the X-Twilio-Signature.
    twilio_sign.py cases COUNT SEED
        prints a JSON list of random {token, url, params, signature} cases: URLs with and
        without ports and query strings, repeated parameters, non-ASCII values.
"""
import json
import random
import sys

from twilio.request_validator import RequestValidator


class MultiDict:
    """What RequestValidator expects for repeated keys (it calls getall, like Flask's)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return iter([k for k, _ in self.pairs])

    def __len__(self):
        return len(self.pairs)

    def getall(self, name):
        return [v for k, v in self.pairs if k == name]


def sign(token, url, pairs):
    return RequestValidator(token).compute_signature(url, MultiDict(pairs))


ALPHABET = "abcXYZ019+&=/? ü€ñ😀%'\""


def random_text(rng, n):
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def random_case(rng):
    scheme = rng.choice(["https", "http"])
    host = rng.choice(["sms.example.com", "gw.example.org", "127.0.0.1"])
    port = rng.choice(["", ":443", ":80", ":8443", ":1234"])
    path = "/twilio/sms/" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_-") for _ in range(22))
    query = rng.choice(["", "?tenant=7", "?a=1&b=2", "?x=%20y&z=%2B1"])
    url = f"{scheme}://{host}{port}{path}{query}"
    names = ["Body", "From", "To", "MessageSid", "AccountSid", "NumMedia", "MediaUrl0", "OptOutType", "SmsStatus", "X"]
    pairs = []
    for _ in range(rng.randint(0, 12)):
        pairs.append((rng.choice(names), random_text(rng, rng.randint(0, 20))))
    token = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return {"token": token, "url": url, "params": pairs, "signature": sign(token, url, pairs)}


def main():
    if sys.argv[1] == "sign":
        req = json.load(sys.stdin)
        print(sign(req["token"], req["url"], [tuple(p) for p in req["params"]]))
    elif sys.argv[1] == "cases":
        rng = random.Random(int(sys.argv[3]))
        print(json.dumps([random_case(rng) for _ in range(int(sys.argv[2]))]))
    else:
        sys.exit(f"unknown command {sys.argv[1]}")


if __name__ == "__main__":
    main()

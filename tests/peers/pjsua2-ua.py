#!/usr/bin/env python3
"""A SIP user agent built on pjsip (PyPI pjsua2-python), driven by smsgw's black-box tests.

    pjsua2-ua.py --user 101 --password pw --domain 127.0.0.1 --registrar 127.0.0.1:5060 \
        [--transport udp|tcp] [--expires 300] [--keep] [--send URI TEXT] [--content-type T]
        [--listen SECONDS]

Registers, prints "REGISTER -> <code> <reason>". With --send, sends a MESSAGE and prints
"MESSAGE -> <code> <reason>". With --listen, prints "RECEIVED from=<uri> ct=<type> body=<text>"
for each MESSAGE that arrives within SECONDS. Exits 0 when registration (and the send) got a 2xx.
Without --keep it unregisters on the way out, as a phone does when it is switched off.
"""
import argparse
import sys
import time

import pjsua2 as pj


class Account(pj.Account):
    def __init__(self):
        super().__init__()
        self.code = None
        self.reason = ""
        self.sent = None

    def onRegState(self, prm):
        self.code = prm.code
        self.reason = prm.reason

    def onInstantMessage(self, prm):
        body = prm.msgBody.replace("\r", "").replace("\n", "\\n")
        print(f"RECEIVED from={prm.fromUri} ct={prm.contentType} body={body}", flush=True)

    def onInstantMessageStatus(self, prm):
        self.sent = (prm.code, prm.reason)

    def onTypingIndication(self, prm):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--registrar", required=True)
    ap.add_argument("--transport", default="udp", choices=["udp", "tcp"])
    ap.add_argument("--expires", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--keep", action="store_true", help="exit without unregistering")
    ap.add_argument("--send", nargs=2, metavar=("URI", "TEXT"))
    ap.add_argument("--content-type", default="text/plain")
    ap.add_argument("--listen", type=float, default=0.0)
    args = ap.parse_args()

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = 0
    cfg.logConfig.consoleLevel = 0
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    ep.libInit(cfg)
    tcfg = pj.TransportConfig()
    tcfg.port = 0
    kind = pj.PJSIP_TRANSPORT_TCP if args.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
    ep.transportCreate(kind, tcfg)
    ep.audDevManager().setNullDev()
    ep.libStart()

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{args.user}@{args.domain}"
    acfg.regConfig.registrarUri = f"sip:{args.registrar};transport={args.transport}"
    acfg.regConfig.timeoutSec = args.expires
    acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", args.user, 0, args.password))
    acc = Account()
    acc.create(acfg)

    deadline = time.time() + args.timeout
    while acc.code is None and time.time() < deadline:
        ep.libHandleEvents(20)
    code, reason = acc.code, acc.reason
    print(f"REGISTER -> {code} {reason}", flush=True)
    ok = code is not None and 200 <= code < 300
    if ok and args.send:
        buddy = pj.Buddy()
        bcfg = pj.BuddyConfig()
        bcfg.uri = args.send[0]
        buddy.create(acc, bcfg)
        if args.content_type == "typing":
            # An RFC 3994 isComposing MESSAGE, as pjsip sends while the user types.
            prm = pj.SendTypingIndicationParam()
            prm.isTyping = True
            buddy.sendTypingIndication(prm)
            acc.sent = ("typing", "sent")
        else:
            prm = pj.SendInstantMessageParam()
            prm.content = args.send[1]
            prm.contentType = args.content_type
            buddy.sendInstantMessage(prm)
        deadline = time.time() + (1 if args.content_type == "typing" else 40)
        while (acc.sent is None or acc.sent[0] == "typing") and time.time() < deadline:
            ep.libHandleEvents(20)
        sent = acc.sent or (None, "no answer")
        print(f"MESSAGE -> {sent[0]} {sent[1]}", flush=True)
        ok = sent[0] == "typing" or (isinstance(sent[0], int) and 200 <= sent[0] < 300)
    deadline = time.time() + args.listen
    while time.time() < deadline:
        ep.libHandleEvents(20)
    if args.keep:
        ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
    else:
        acc.shutdown()
        ep.libDestroy()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

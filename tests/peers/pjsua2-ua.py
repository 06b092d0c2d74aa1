#!/usr/bin/env python3
"""A SIP user agent built on pjsip (PyPI pjsua2-python), driven by smsgw's black-box tests.

    pjsua2-ua.py --user 101 --password pw --domain 127.0.0.1 --registrar 127.0.0.1:5060 \
        [--transport udp|tcp] [--expires 300] [--keep]

Registers, prints "REGISTER -> <code> <reason>" and exits 0 on 2xx, 1 otherwise. Without --keep
it unregisters on the way out, as a phone does when it is switched off.
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

    def onRegState(self, prm):
        self.code = prm.code
        self.reason = prm.reason


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
    if args.keep:
        ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
    else:
        acc.shutdown()
        ep.libDestroy()
    sys.exit(0 if code is not None and 200 <= code < 300 else 1)


if __name__ == "__main__":
    main()

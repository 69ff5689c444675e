#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/).

The files are small, readable inputs: valid messages of every client type, edge
cases, and the attack inputs of issue 10 (130- and 30,000-segment paths, U+0000 in
values, keys and paths, deep nesting). Run it again after changing it; the output is
deterministic. Inputs found by fuzzing that once failed are kept next to these as
`regression-*` files (this script does not touch them).
"""

import base64
import json
import os
import random

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
rnd = random.Random(20260101)


def uid(n):
    return "00000000-0000-0000-0000-%012x" % n


PCS = [uid(0xC1), uid(0xC2), uid(0xC3)]
GOBLINS = [uid(0x6001), uid(0x6002)]
MSG_ID = uid(0x1D)


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def dumps(v):
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def deep(n, leaf=1, obj=False):
    v = leaf
    for _ in range(n):
        v = {"a": v} if obj else [v]
    return v


# Data of every WebSocket client type (as the rules' tests use them).
TYPES = {
    "state_update": {"changes": [{"path": "/map/tokens/0", "value": {"x": 1}},
                                 {"path": "/notes", "op": "remove"}]},
    "leave": {},
    "session_start": {},
    "session_pause": {},
    "session_resume": {},
    "session_end": {},
    "spawn_character": {"character_id": GOBLINS[1], "sheet": {"name": "Goblin", "max_hp": 7, "ac": 15,
                                                               "position": {"x": 7, "y": 0}}},
    "character_update": {"character_id": PCS[0], "changes": {"hp": 12, "conditions": ["poisoned"]}},
    "place_character": {"character_id": PCS[1], "position": {"x": 3, "y": 4}},
    "combat_start": {"participants": PCS + GOBLINS, "surprised": [GOBLINS[0]]},
    "combat_add": {"participants": [GOBLINS[1]]},
    "combat_end": {},
    "initiative_roll": {"character_id": PCS[0], "roll": 17, "modifiers": {"bless": 2}},
    "end_turn": {},
    "action_declare": {"character_id": PCS[0], "action_type": "attack", "targets": [GOBLINS[0]],
                       "details": {"attack_bonus": 5, "damage": "1d8+3", "damage_type": "slashing"}},
    "move": {"character_id": PCS[0], "to": {"x": 2, "y": 0}, "path": [{"x": 1, "y": 0}]},
    "stand_up": {"character_id": PCS[0]},
    "apply_condition": {"character_id": GOBLINS[0], "condition": "restrained",
                        "duration": {"rounds": 2, "ends": "end", "of": "actor"},
                        "save_ends": {"ability": "str", "dc": 12}},
    "remove_condition": {"character_id": GOBLINS[0], "condition": "restrained"},
    "end_concentration": {"character_id": PCS[2]},
    "terrain_set": {"squares": [{"x": 1, "y": 1, "difficult": True, "cover": "half"}], "clear": False},
    "reaction_decline": {"character_id": GOBLINS[0]},
    "rollback": {"to_version": 3},
}


def envelope(kind, data, id_=MSG_ID):
    return dumps({"id": id_, "type": kind, "data": data})


def client_message():
    t = "client_message"
    for kind, data in TYPES.items():
        write(t, "type-" + kind, envelope(kind, data))
    write(t, "heartbeat", dumps({"id": MSG_ID, "type": "heartbeat"}))
    write(t, "sync-request", envelope("sync_request", {"paths": ["/map", "/a~1b"]}))
    write(t, "no-id", dumps({"type": "leave", "data": {}}))
    write(t, "bad-id", dumps({"id": "12", "type": "leave"}))
    write(t, "id-number", '{"id":12,"type":"leave"}')
    write(t, "type-upper", envelope("State_Update", {}))
    write(t, "type-long", envelope("a" * 65, {}))
    write(t, "data-array", '{"id":"%s","type":"leave","data":[1]}' % MSG_ID)
    write(t, "data-null", '{"id":"%s","type":"leave","data":null}' % MSG_ID)
    write(t, "duplicate-keys", '{"id":"%s","type":"leave","type":"session_end","data":{},"data":{"x":1}}' % MSG_ID)
    write(t, "save-state-over-ws", envelope("save_state", {"state": {}, "metadata": {}}))
    write(t, "unknown-type", envelope("fly", {}))
    write(t, "not-json", "{nope")
    write(t, "bom", "\ufeff" + envelope("leave", {}))
    write(t, "path-130-segments", envelope("state_update", {"changes": [{"path": "/a" * 130, "value": 1}]}))
    write(t, "path-30000-segments", envelope("state_update", {"changes": [{"path": "/a" * 30000, "value": 1}]}))
    write(t, "nul-in-value", envelope("state_update", {"changes": [{"path": "/a", "value": "x\u0000y"}]}))
    write(t, "nul-in-key", envelope("state_update", {"changes": [{"path": "/a", "value": {"k\u0000": 1}}]}))
    write(t, "nul-in-path", envelope("state_update", {"changes": [{"path": "/a\u0000", "value": 1}]}))
    write(t, "escaped-backslash-u0000", '{"id":"%s","type":"leave","data":{"x":"\\\\u0000"}}' % MSG_ID)
    for n in (61, 62, 63, 64, 200):
        write(t, "deep-%d" % n, envelope("state_update", {"changes": [{"path": "/a", "value": deep(n)}]}))
    write(t, "deep-envelope-300", "[" * 300 + "]" * 300)
    write(t, "too-large", envelope("state_update", {"changes": [{"path": "/a", "value": "x" * 70000}]}))
    write(t, "huge-numbers", envelope("initiative_roll", {"character_id": PCS[0], "roll": 18446744073709551616,
                                                         "modifiers": {"a": -9223372036854775809}}))
    write(t, "float-exp", '{"id":"%s","type":"rollback","data":{"to_version":1e400}}' % MSG_ID)
    write(t, "lone-surrogate", '{"id":"%s","type":"leave","data":{"x":"\\ud800"}}' % MSG_ID)
    write(t, "previous-null", envelope("state_update", {"changes": [{"path": "/a", "value": 1, "previous": None}]}))
    write(t, "changes-101", envelope("state_update", {"changes": [{"path": "/a%d" % i, "value": i} for i in range(101)]}))


def pointer():
    t = "pointer"
    rfc = {"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3, "g|h": 4, "i\\j": 5,
           "k\"l": 6, " ": 7, "m~n": 8}
    paths = ["", "/foo", "/foo/0", "/", "/a~1b", "/c%d", "/e^f", "/g|h", "/i\\j", "/k\"l", "/ ", "/m~0n"]
    write(t, "rfc6901-get", dumps({"doc": rfc, "ops": [["get", p] for p in paths]}))
    write(t, "rfc6901-set-remove", dumps({"doc": rfc, "ops": [["set", p, 1] for p in paths[1:]] +
                                          [["remove", p] for p in paths[1:]]}))
    write(t, "create-intermediates", dumps({"doc": {}, "ops": [["set", "/characters/abc/hp", 12],
                                                                ["set", "/characters/abc/hp", 9],
                                                                ["remove", "/characters/abc"]]}))
    write(t, "arrays", dumps({"doc": {"l": [1, 2]}, "ops": [
        ["set", "/l/-", 3], ["set", "/l/3", 4], ["set", "/l/9", 5], ["set", "/l/01", 0],
        ["check", "/l/5", 1], ["remove", "/l/0"], ["remove", "/l/-"], ["remove", "/l/7"],
        ["set", "/l/0/x", 1], ["get", "/l/-1"], ["remove", "/l/0"], ["remove", "/l/0"], ["remove", "/l/0"]]}))
    write(t, "root", dumps({"doc": {"a": 1}, "ops": [["set", "", 5], ["set", "", {"z": [1]}],
                                                     ["remove", ""], ["check", "", []], ["get", ""]]}))
    write(t, "malformed", dumps({"doc": {"a": {"b": 1}}, "ops": [
        ["get", "a"], ["set", "a", 1], ["get", "/a~2"], ["set", "/a~", 1], ["remove", "/a/~"],
        ["check", "x/y", 1]]}))
    write(t, "scalars", dumps({"doc": {"s": "x", "n": 1, "z": None}, "ops": [
        ["set", "/s/t", 1], ["set", "/n/0", 1], ["remove", "/z/a"], ["get", "/s/0"], ["check", "/z/-", 1]]}))
    write(t, "path-130-segments", dumps({"doc": {}, "ops": [["set", "/a" * 130, 1], ["get", "/a" * 130],
                                                             ["check", "/a" * 130, 1], ["remove", "/a" * 130]]}))
    write(t, "path-30000-segments", dumps({"doc": {}, "ops": [["set", "/a" * 30000, 1], ["get", "/a" * 30000],
                                                               ["check", "/a" * 30000, 1],
                                                               ["remove", "/a" * 30000]]}))
    write(t, "path-32-and-33", dumps({"doc": {}, "ops": [["set", "/a" * 32, 1], ["set", "/b" * 33, 1],
                                                          ["remove", "/a" * 32]]}))
    write(t, "nul", dumps({"doc": {"\u0000": 1}, "ops": [["set", "/\u0000", "\u0000"], ["get", "/\u0000"],
                                                          ["set", "/k\u0000/x", {"\u0000": "\u0000"}],
                                                          ["remove", "/\u0000"]]}))
    write(t, "escapes", dumps({"doc": {}, "ops": [["set", "/~0~1/~1~0", 1], ["get", "/~0~1/~1~0"],
                                                   ["set", "/é/😀", "\"\\\n"], ["remove", "/~0~1"]]}))
    write(t, "deep-doc-47", dumps({"doc": deep(46, 1, True), "ops": [["set", "/a" * 46, {"b": 1}],
                                                                       ["set", "/a" * 45, [[1]]],
                                                                       ["remove", "/a" * 10]]}))
    write(t, "deep-doc-130", dumps({"doc": deep(120, 1, True), "ops": [["get", "/a" * 100]]}))
    write(t, "deep-value", dumps({"doc": {}, "ops": [["set", "/a", deep(47)], ["set", "/b", deep(48)],
                                                      ["set", "/c/d", deep(100)]]}))
    wide = {"k%d" % i: i for i in range(999)}
    write(t, "wide-1000", dumps({"doc": wide, "ops": [["set", "/k999", 1], ["set", "/k1000", 1],
                                                      ["remove", "/k0"], ["set", "/x", {"k%d" % i: 0 for i in range(1001)}]]}))
    write(t, "numbers", dumps({"doc": {}, "ops": [["set", "/a", 18446744073709551615], ["set", "/b", -9223372036854775808],
                                                  ["set", "/c", 1e308], ["set", "/d", -0.0], ["set", "/e", 0.1],
                                                  ["remove", "/c"]]}))
    write(t, "long-value", dumps({"doc": {}, "ops": [["set", "/a", "x" * 70000], ["set", "/b", "x" * 1000]]}))
    write(t, "long-path", dumps({"doc": {}, "ops": [["set", "/" + "p" * 1023, 1], ["set", "/" + "p" * 1024, 1]]}))
    write(t, "replace-types", dumps({"doc": {"a": [1, {"b": [2]}]}, "ops": [
        ["set", "/a/1/b/0", {"c": 3}], ["set", "/a/1/b/0/c", []], ["set", "/a/1/b/0/c/-", 1],
        ["remove", "/a/1/b"], ["set", "/a/1", None], ["remove", "/a"]]}))
    for i in range(6):
        write(t, "bytes-%d" % i, bytes(rnd.randrange(256) for _ in range(rnd.randrange(16, 400))))


def cmd(who, kind, data):
    return [who, kind, data]


def decide():
    t = "decide"
    everything = 255  # 3 players, observer, 2 goblins, started, client rolls, combat
    for kind, data in TYPES.items():
        for setup, label in ((everything, "combat"), (0b00111111, "active")):
            who = 0 if kind in ("spawn_character", "combat_start", "combat_add", "combat_end",
                                "apply_condition", "remove_condition", "terrain_set", "rollback",
                                "session_start", "session_pause", "session_resume", "session_end",
                                "character_update", "place_character") else 1
            write(t, "%s-%s" % (label, kind), dumps({"setup": setup, "commands": [cmd(who, kind, data)]}))
    write(t, "rest-join-save", dumps({"setup": 0, "commands": [
        cmd(1, "join", {"character_id": PCS[0], "character": {"name": "A", "max_hp": 10, "ac": 12}}),
        cmd(5, "join", {"role": "dm"}), cmd(4, "join", {"role": "observer", "character_id": PCS[1]}),
        cmd(0, "save_state", {"state": {"map": {"w": 10}}, "metadata": {"v": 1}}),
        cmd(1, "save_state", {"state": {}}), cmd(0, "save_state", {"state": [1]}),
        cmd(1, "leave", {}), cmd(1, "leave", {})]}))
    write(t, "attack-path-130", dumps({"setup": 63, "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/a" * 130, "value": 1}]}),
        cmd(0, "state_update", {"changes": [{"path": "/a" * 32, "value": 1}]}),
        cmd(0, "state_update", {"changes": [{"path": "/a" * 33, "value": 1}]})]}))
    write(t, "attack-path-30000", dumps({"setup": 63, "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/a" * 30000, "value": 1}]})]}))
    write(t, "attack-nul", dumps({"setup": 63, "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/a", "value": "x\u0000"}]}),
        cmd(1, "state_update", {"changes": [{"path": "/\u0000", "value": 1}]}),
        cmd(1, "state_update", {"changes": [{"path": "/b", "value": {"\u0000": 1}}]}),
        cmd(0, "save_state", {"state": {"k": "\u0000"}}),
        cmd(0, "spawn_character", {"sheet": {"name": "G\u0000", "max_hp": 7, "ac": 15}})]}))
    write(t, "attack-deep-values", dumps({"setup": 63, "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/a", "value": deep(n)}]}) for n in (46, 47, 48, 60, 61, 130)] +
        [cmd(0, "save_state", {"state": {"a": deep(n)}}) for n in (46, 47, 60)]}))
    big = "x" * 60000
    write(t, "attack-document-size", dumps({"setup": 63, "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/p%d" % i, "value": big}]}) for i in range(6)] +
        [cmd(1, "state_update", {"changes": [{"path": "/p0", "op": "remove"}]}),
         cmd(1, "state_update", {"changes": [{"path": "/q", "value": big}]}),
         cmd(0, "save_state", {"state": {"a": big, "b": big, "c": big, "d": big, "e": big}}),
         cmd(0, "rollback", {"to_version": 9})]}))
    write(t, "attack-wide", dumps({"setup": 63, "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/w", "value": {"k%d" % i: i for i in range(1000)}}]}),
        cmd(1, "state_update", {"changes": [{"path": "/w/k1000", "value": 1}]}),
        cmd(1, "state_update", {"changes": [{"path": "/v", "value": {"k%d" % i: i for i in range(1001)}}]})]}))
    write(t, "small-limits", dumps({"setup": 63, "limits": {"max_path_depth": 2, "max_path_bytes": 8,
                                                            "max_depth": 3, "max_value_bytes": 20,
                                                            "max_document_bytes": 60, "max_keys_per_object": 3},
                                    "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/a", "value": "%s" % ("y" * n)}]}) for n in range(10, 40, 7)] +
        [cmd(1, "state_update", {"changes": [{"path": "/b", "value": 1}, {"path": "/c", "value": 2},
                                             {"path": "/d", "value": 3}, {"path": "/a", "op": "remove"}]}),
         cmd(1, "state_update", {"changes": [{"path": "/a/b/c", "value": 1}]}),
         cmd(0, "save_state", {"state": {"a": {"b": {"c": {}}}}}),
         cmd(0, "rollback", {"to_version": 2})]}))
    write(t, "multi-change-interplay", dumps({"setup": 63, "commands": [
        cmd(1, "state_update", {"changes": [{"path": "/l", "value": []}, {"path": "/l/-", "value": 1},
                                            {"path": "/l/0", "value": 2, "previous": 1},
                                            {"path": "/l/1", "value": 3}, {"path": "/l/0", "op": "remove"}]}),
        cmd(1, "state_update", {"changes": [{"path": "/x", "value": 1, "previous": None},
                                            {"path": "/x", "op": "remove", "value": 1}]}),
        cmd(1, "state_update", {"changes": []}),
        cmd(1, "state_update", {"changes": [{"path": "/m%d" % i, "value": i} for i in range(101)]})]}))
    write(t, "lifecycle-and-roles", dumps({"setup": 7, "commands": [
        cmd(1, "session_start", {}), cmd(0, "session_start", {}), cmd(0, "session_start", {}),
        cmd(4, "state_update", {"changes": [{"path": "/a", "value": 1}]}),
        cmd(5, "state_update", {"changes": [{"path": "/a", "value": 1}]}),
        cmd(6, "state_update", {"changes": [{"path": "/a", "value": 1}]}),
        cmd(0, "session_pause", {}), cmd(1, "state_update", {"changes": [{"path": "/a", "value": 2}]}),
        cmd(0, "session_resume", {}), cmd(0, "rollback", {"to_version": 1}),
        cmd(0, "session_end", {}), cmd(0, "session_resume", {}),
        cmd(1, "state_update", {"changes": [{"path": "/a", "value": 3}]}), cmd(0, "rollback", {"to_version": 2})]}))
    write(t, "combat-round", dumps({"setup": everything, "commands": [
        cmd(1, "action_declare", TYPES["action_declare"]), cmd(1, "move", TYPES["move"]),
        cmd(1, "end_turn", {}), cmd(2, "end_turn", {}), cmd(3, "end_turn", {}), cmd(0, "end_turn", {}),
        cmd(0, "action_declare", {"character_id": GOBLINS[0], "action_type": "save", "targets": PCS,
                                  "details": {"save": {"ability": "dex", "dc": 13, "half_on_success": True},
                                              "damage": "3d6", "damage_type": "fire"}}),
        cmd(0, "end_turn", {}), cmd(0, "rollback", {"to_version": 12}), cmd(0, "combat_end", {})]}))
    write(t, "odd-types", dumps({"setup": everything, "commands": [
        cmd(1, "character_sync", {"character_id": PCS[0], "changes": {"hp": 1}}),
        cmd(1, "fly", {}), cmd(1, "leave", [1]), cmd(1, "leave", None), cmd(1, "move", "x"),
        cmd(0, "rollback", {"to_version": 18446744073709551615}),
        cmd(1, "initiative_roll", {"character_id": PCS[0], "roll": 4294967296})]}))
    for i in range(8):
        write(t, "bytes-%d" % i, bytes(rnd.randrange(256) for _ in range(rnd.randrange(64, 1500))))


def b64(v):
    return base64.urlsafe_b64encode(v.encode()).rstrip(b"=").decode()


def token():
    t = "token"
    user, session = uid(0xA1), uid(0x5E55)
    far = 4102444800  # 2100-01-01
    hs = dumps({"alg": "HS256", "typ": "JWT"})

    def signed(name, claims, header=hs, prefix="sign:"):
        write(t, prefix.rstrip(":") + "-" + name, prefix + header + "\n" + dumps(claims))

    signed("access", {"sub": user, "role": "player", "exp": far})
    signed("access-admin", {"sub": user, "role": "admin", "exp": far, "iat": 1})
    signed("session", {"sub": user, "sid": session, "exp": far, "typ": "session"})
    signed("session-other-session", {"sub": user, "sid": uid(1), "exp": far, "typ": "session"})
    signed("session-other-user", {"sub": uid(2), "sid": session, "exp": far, "typ": "session"})
    signed("expired", {"sub": user, "role": "player", "exp": 1})
    signed("exp-u64-max", {"sub": user, "role": "player", "exp": 18446744073709551615})
    signed("exp-past-u64", {"sub": user, "role": "player", "exp": 18446744073709551616})
    signed("exp-float", {"sub": user, "role": "player", "exp": 1e300})
    signed("exp-negative", {"sub": user, "role": "player", "exp": -1})
    signed("exp-string", {"sub": user, "role": "player", "exp": "soon"})
    signed("no-exp", {"sub": user, "role": "player"})
    signed("no-sub", {"role": "player", "exp": far})
    signed("sub-not-uuid", {"sub": "alice", "role": "player", "exp": far})
    signed("role-unknown", {"sub": user, "role": "god", "exp": far})
    signed("typ-other", {"sub": user, "role": "player", "exp": far, "typ": "refresh"})
    signed("nbf-future", {"sub": user, "role": "player", "exp": far, "nbf": far - 1})
    signed("aud-iss", {"sub": user, "role": "player", "exp": far, "aud": ["x", 1], "iss": {"a": 1}})
    signed("nul-sub", {"sub": "\u0000", "role": "player", "exp": far})
    signed("claims-array", [1, 2])
    signed("hs512", {"sub": user, "role": "player", "exp": far}, dumps({"alg": "HS512"}))
    signed("rs256-header", {"sub": user, "role": "player", "exp": far}, dumps({"alg": "RS256"}))
    signed("kid-long", {"sub": user, "role": "player", "exp": far}, dumps({"alg": "HS256", "kid": "k" * 5000}))
    signed("deep-claims", {"sub": user, "role": "player", "exp": far, "x": deep(120)})
    strict = {"sub": user, "role": "dm", "exp": far, "iss": "gs-fuzz-iss", "aud": "gs-fuzz-aud"}
    signed("strict", strict)
    signed("strict-aud-list", dict(strict, aud=["x", "gs-fuzz-aud"]))
    signed("strict-wrong-aud", dict(strict, aud="other"))
    signed("strict-wrong-iss", dict(strict, iss="other"))
    signed("strict-aud-number", dict(strict, aud=5))
    for prefix in ("rsa:", "ec:"):
        alg = "RS256" if prefix == "rsa:" else "ES256"
        signed("strict", strict, dumps({"alg": alg}), prefix)
        signed("strict-kid-1", strict, dumps({"alg": alg, "kid": "rsa-1" if prefix == "rsa:" else "ec-1"}), prefix)
        signed("kid-unknown", strict, dumps({"alg": alg, "kid": "nope"}), prefix)
        signed("nbf-future", dict(strict, nbf=far - 1), dumps({"alg": alg}), prefix)
        signed("session", {"sub": user, "sid": session, "exp": far, "typ": "session"}, dumps({"alg": alg}), prefix)
    signed("hs256-header", strict, hs, "rsa:")
    raw = {
        "empty": "",
        "dots": "..",
        "three-words": "a.b.c",
        "not-a-jwt": "not.a.jwt",
        "four-parts": "a.b.c.d",
        "alg-none": b64(dumps({"alg": "none"})) + "." + b64(dumps({"sub": user, "role": "admin", "exp": far})) + ".",
        "header-not-json": b64("{{{") + "." + b64("{}") + ".sig",
        "header-deep": b64("[" * 5000) + "." + b64("{}") + ".sig",
        "bad-base64": "%%%.$$$.***",
        "long": "a" * 100000 + "." + "b" * 10 + ".c",
        "unicode": "é.😀.\u0000",
        "whitespace": " eyJhbGciOiJIUzI1NiJ9 . e30 . x ",
    }
    for name, v in raw.items():
        write(t, "raw-" + name, v)


client_message()
pointer()
decide()
token()

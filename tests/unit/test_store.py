"""The Redis layout's names, encodings and version check (sync/store.py): pure, no Redis."""

from __future__ import annotations

from gateway.sync import store
from gateway.sync.store import LEGACY_VERSION, SCHEMA_VERSION, Keys


def test_every_key_is_named_under_the_prefix():
    k = Keys("p1")
    names = [k.schema, k.hb, k.inflight, k.gen, k.weights, k.cooldown, k.act, k.sampled, k.keys, k.keys_ver,
             k.win("up:a", 7), k.samples("up:a")]
    assert all(n.startswith("p1:") for n in names)
    assert len(set(names)) == len(names)
    # The names older tooling and tests use keep their spelling.
    assert (k.keys, k.keys_ver, k.weights, k.inflight) == ("p1:keys", "p1:keys:ver", "p1:weights", "p1:inflight")
    assert k.win("up:a", 7) == "p1:win:up:a:7"


def test_inflight_rows_carry_only_nonzero_counts_and_round_trip():
    row = store.encode_inflight({"a": 2, "b": 0, "c": 1})
    assert row == '{"a":2,"c":1}'
    assert store.decode_inflight(row.encode()) == {"a": 2, "c": 1}
    assert store.encode_inflight({f"u{i}": 0 for i in range(300)}) == "{}"  # idle fleet: a few bytes
    assert store.decode_inflight(b"not json") == {} and store.decode_inflight(b"[1]") == {}


def test_window_fields_group_by_slot_and_decode_skipping_own_replica():
    enc = store.encode_window({19: [1, 0, 5, 0, 0], 20: [2, 30, 0, 0, 1]}, "R1")
    assert enc == {1: {"19:0:R1": 1, "19:2:R1": 5}, 2: {"20:0:R1": 2, "20:1:R1": 30, "20:4:R1": 1}}
    raw = {b"20:0:R1": b"2", b"20:0:R2": b"4", b"20:1:R2:x": b"7", b"junk": b"1", b"x:1:R3": b"1"}
    # Own fields are skipped; a replica id containing ':' stays whole; unreadable fields are dropped.
    assert sorted(store.decode_window(raw, "R1")) == [(20, 0, 4), (20, 1, 7)]
    assert sorted(store.decode_window(raw, "R2:x")) == [(20, 0, 2), (20, 0, 4)]


def test_act_members_round_trip_with_odd_names():
    m = store.encode_act("up:with|odd,chars", 12, "host-1:2")
    assert store.decode_act(m.encode()) == ("up:with|odd,chars", 12, "host-1:2")
    assert store.decode_act(b"garbage") is None and store.decode_act(b'["x"]') is None


def test_floats_and_counters_decode_and_skip_garbage():
    assert store.decode_floats({b"a": store.encode_float(0.25).encode(), b"b": b"nan?"}) == {"a": 0.25}
    assert store.decode_counters({b"weights": b"3", b"x": b"y"}) == {"weights": 3}


def test_version_check_names_every_live_replica_of_another_version():
    versions = {"me": SCHEMA_VERSION, "same": SCHEMA_VERSION, "newer": SCHEMA_VERSION + 1, "dead": 99}
    alive = ["me", "same", "newer", "legacy"]
    assert store.mismatched(alive, versions, "me") == {"newer": SCHEMA_VERSION + 1, "legacy": LEGACY_VERSION}
    assert store.mismatched(["me", "same"], versions, "me") == {}
    assert store.mismatched(["me"], {}, "me") == {}  # not yet announced itself: never a conflict with itself

"""Shard routing agrees with Kafka's default partitioner; bad shard settings are refused."""

from __future__ import annotations

import re

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from dmp.config import Settings
from dmp.ids import LOCAL_BITS, uid_hash
from dmp.replica import Replica
from dmp.shards import Misdirected, Shard, parse_shard, partition_of, shard_of
from dmp.shards import murmur2 as our_murmur2
from segment_rules import CompiledRules, load_rules_file
from tests.conftest import EXAMPLE_RULES


def test_routing_agrees_with_aiokafkas_partitioner_for_many_keys() -> None:
    partitioner = DefaultPartitioner()
    for partitions in (1, 2, 3, 4, 7, 128):
        everyone = list(range(partitions))
        for n in range(5_000):
            uid = f"cookie-{n}-{n * 7919:x}"
            expected = partitioner(uid.encode(), everyone, everyone)
            assert partition_of(uid, partitions) == expected, (uid, partitions)


@given(st.binary(max_size=64))
def test_murmur2_equals_kafkas_for_any_bytes(data: bytes) -> None:
    # Every tail length (0 to 3 bytes after whole words) and bytes >= 0x80.
    assert our_murmur2(data) == murmur2(data)


@given(st.text(max_size=40))
def test_non_ascii_cookie_ids_route_like_their_utf8_key(uid: str) -> None:
    expected = DefaultPartitioner()(uid.encode(), list(range(4)), [])
    assert partition_of(uid, 4) == expected


def test_shards_spread_cookies_and_own_partitions_by_modulo() -> None:
    shard = Shard(1, 2, 4)
    assert shard.owned_partitions == [1, 3]
    assert [shard.owns_partition(p) for p in range(4)] == [False, True, False, True]
    counts = [0, 0]
    for n in range(10_000):
        counts[shard_of(f"u{n}", 4, 2)] += 1
    assert min(counts) > 4_500  # murmur2 spreads evenly


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("2/2", "DMP_LOOKUP_SHARD='2/2': the shard index counts from 0, so with 2 shards it "
                "must be 0 to 1, got 2"),
        ("0/0", "DMP_LOOKUP_SHARD='0/0': the shard count must be at least 1, got 0"),
        ("-1/2", "with 2 shards it must be 0 to 1, got -1"),
        ("1", "DMP_LOOKUP_SHARD='1': expected INDEX/COUNT such as 0/2"),
        ("a/b", "DMP_LOOKUP_SHARD='a/b': expected INDEX/COUNT"),
        ("0/8", "DMP_LOOKUP_SHARD='0/8': 8 shards need at least 8 partitions, and "
                "DMP_KAFKA_PARTITIONS is 4: some shards would hold nothing"),
    ],
)  # fmt: skip
def test_bad_shard_settings_are_refused_with_the_reason(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env({"DMP_LOOKUP_SHARD": raw, "DMP_KAFKA_PARTITIONS": "4"})


def test_shard_settings_parse() -> None:
    settings = Settings.from_env({"DMP_LOOKUP_SHARD": " 1/2 ", "DMP_KAFKA_PARTITIONS": "4"})
    assert parse_shard(settings.lookup.shard, settings.kafka.partitions) == Shard(1, 2, 4)
    assert parse_shard("", 4) is None
    assert Settings.from_env({}).lookup.shard == ""


def _other_shards_cookie(shard: Shard) -> str:
    return next(
        uid for n in range(100) if shard_of(uid := f"u{n}", shard.partitions, shard.count) != 0
    )


def test_a_shard_replica_refuses_another_shards_cookie_and_answers_its_own() -> None:
    shard = Shard(0, 2, 4)
    replica = Replica(CompiledRules(load_rules_file(EXAMPLE_RULES)), shard=shard)
    stranger = _other_shards_cookie(shard)
    with pytest.raises(Misdirected) as excinfo:
        replica.segments(stranger)
    partition = partition_of(stranger, 4)
    assert excinfo.value.doc() == {
        "error": f"this cookie belongs to shard 1/2 (partition {partition} of 4); "
        "this replica is shard 0/2",
        "shard": 1,
        "shards": 2,
        "partition": partition,
    }
    with pytest.raises(Misdirected):
        replica.base_segments(stranger)
    # Its own unknown cookie is simply in no segment; a known one is answered.
    own = next(uid for n in range(100) if shard_of(uid := f"o{n}", 4, 2) == 0)
    assert replica.segments(own) == []
    position = partition_of(own, 4) << LOCAL_BITS
    replica.add_ids([(position, uid_hash(own))])
    replica.add("auto_new_car_intent", [position])
    assert replica.segments(own) == ["auto_new_car_intent"]
    # A full replica never refuses.
    assert Replica(CompiledRules(load_rules_file(EXAMPLE_RULES))).segments(stranger) == []

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from bidder_adapter.partner_file import PartnerFileError, load_partner_file, parse_partner_bytes
from bidder_adapter.partner_metrics import PartnerMetrics
from bidder_adapter.partner_registry import PartnerRegistry
from tests.bidder_adapter.partner_yaml import ACME_KEY, partner_yaml, write_partners


def errors_of(text: str) -> list[str]:
    with pytest.raises(PartnerFileError) as info:
        parse_partner_bytes(text.encode(), "partners.yaml")
    return [str(e) for e in info.value.errors]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_valid_file_loads_with_its_version(tmp_path: Path) -> None:
    text = partner_yaml()
    path = write_partners(tmp_path / "partners.yaml", text)
    config = load_partner_file(path)
    assert list(config.profiles) == ["acme-dsp", "beta-ssp"]
    assert config.version == hashlib.sha256(text.encode()).hexdigest()
    acme = config.profiles["acme-dsp"]
    assert config.profiles.by_api_key(ACME_KEY) is acme
    assert acme.sync_url.startswith("https://sync.acme.example/match?dmp=${UID}")
    assert config.profiles.by_prebid_bidder("beta") is config.profiles["beta-ssp"]
    assert acme.destination is None


def test_value_errors_point_at_file_line_column() -> None:
    text = partner_yaml().replace("segtax: 600", "segtax: 3")
    line = line_of(text, "segtax: 3")
    assert errors_of(text) == [
        f"partners.yaml:{line}:5: partners[0].segtax: must be 4 or >= 500, got 3"
    ]


def test_list_items_and_mapped_keys_are_located() -> None:
    text = partner_yaml(acme_map='""').replace("[cookie, eids]", "[cookie, fax]")
    empty_map_line = line_of(text, 'auto_new_car_intent: ""')
    assert errors_of(text) == [
        f"partners.yaml:{empty_map_line}:7: "
        "partners[0].segment_id_map.auto_new_car_intent: must not be empty",
        f"partners.yaml:{line_of(text, '[cookie, fax]')}:31: "
        "partners[1].user_id_sources[1]: must be one of 'cookie', 'buyeruid', 'eids', got 'fax'",
    ]


def test_missing_key_points_at_its_partner() -> None:
    text = partner_yaml().replace("    data_provider_name: Example DMP\n", "", 1)
    assert errors_of(text) == [
        f"partners.yaml:{line_of(text, 'partner_id: acme-dsp')}:5: "
        "partners[0].data_provider_name: required key is missing"
    ]


def test_destination_errors() -> None:
    destination = "    destination: {kind: http, url: ftp://x, batch_size: 0}\n"
    text = partner_yaml(destination=destination)
    line = line_of(text, "destination:")
    assert errors_of(text) == [
        f"partners.yaml:{line}:31: partners[0].destination.url: must be an http(s) URL, got 'ftp://x'",
        f"partners.yaml:{line}:45: partners[0].destination.batch_size: must be 1 to 100000, got 0",
    ]


def test_sync_url_needs_the_uid_macro() -> None:
    text = partner_yaml().replace("dmp=${UID}", "dmp=X")
    assert errors_of(text) == [
        f"partners.yaml:{line_of(text, 'sync_url:')}:5: "
        "partners[0].sync_url: must contain the ${UID} macro for our cookie id"
    ]


def test_valid_destination_is_read() -> None:
    destination = (
        "    destination:\n      kind: file\n      path: /tmp/out\n"
        "      interval_seconds: 0.5\n      user_id: partner\n"
    )
    config = parse_partner_bytes(partner_yaml(destination=destination).encode(), "p.yaml")
    dest = config.profiles["acme-dsp"].destination
    assert dest is not None
    assert (dest.kind, dest.path, dest.interval_seconds, dest.user_id) == (
        "file",
        "/tmp/out",
        0.5,
        "partner",
    )
    assert dest.batch_size == 500


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "partners.yaml:1:1: the file is empty; expected 'partners:'"),
        ("# only a comment\n", "partners.yaml:1:1: the file is empty; expected 'partners:'"),
        ("partners: [\n", "partners.yaml:2:1: YAML syntax error:"),
        ("partners: []\npartners: []\n", "partners.yaml:2:1: duplicate key 'partners'"),
        ("partners: 7\n", "partners.yaml:1:1: partners: must be a list, got integer 7"),
        ("- 1\n", "partners.yaml:1:1: <document>: must be a mapping, got list"),
    ],
)
def test_document_errors(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert len(errors) == 1
    assert errors[0].startswith(expected), errors[0]


def test_integer_keys_are_refused_with_their_place() -> None:
    text = partner_yaml().replace('{geo_socal: "56"}', "{806: x}")
    (error,) = errors_of(text)
    assert error.startswith(f"partners.yaml:{line_of(text, '{806: x}')}:")
    assert "keys must be text" in error


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PartnerFileError, match="cannot read"):
        load_partner_file(tmp_path / "missing.yaml")


def test_registry_swaps_whole_versions_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = write_partners(tmp_path / "partners.yaml", partner_yaml())
    registry = PartnerRegistry(path, PartnerMetrics.create())
    first = registry.load()
    assert registry.reload().changed is False

    write_partners(path, partner_yaml(acme_map="acme-v2"))
    result = registry.reload()
    assert result.changed
    assert result.ok
    assert registry.current is result.config is not first
    assert registry.current.profiles["acme-dsp"].view(["auto_new_car_intent"]) == ["acme-v2"]

    write_partners(path, partner_yaml().replace("segtax: 600", "segtax: 3"))
    refused = registry.reload()
    assert not refused.ok
    assert not refused.changed
    assert refused.errors[0].startswith(f"{path}:")
    assert registry.current is result.config  # still the last good version


def test_first_load_of_a_bad_file_raises(tmp_path: Path) -> None:
    path = write_partners(tmp_path / "partners.yaml", "partners: 7\n")
    with pytest.raises(PartnerFileError):
        PartnerRegistry(path, PartnerMetrics.create()).load()


def test_no_path_means_no_partners() -> None:
    registry = PartnerRegistry(None, PartnerMetrics.create())
    assert len(registry.load().profiles) == 0
    assert registry.reload().changed is False


async def test_watch_picks_up_a_changed_file(tmp_path: Path) -> None:
    path = write_partners(tmp_path / "partners.yaml", partner_yaml())
    registry = PartnerRegistry(path, PartnerMetrics.create())
    registry.load()
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(stop, interval=0.01))
    write_partners(path, partner_yaml(acme_map="acme-v3"))
    for _ in range(500):
        if (
            registry.current.profiles["acme-dsp"].segment_id_map.get("auto_new_car_intent")
            == "acme-v3"
        ):
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert registry.current.profiles["acme-dsp"].view(["auto_new_car_intent"]) == ["acme-v3"]

"""A partner file for tests: two partners with different grants and mappings of one user."""

from __future__ import annotations

from pathlib import Path

from bidder_adapter.profiles import hash_api_key

ACME_KEY = "acme-secret-key-0001"
BETA_KEY = "beta-secret-key-0002"
ADMIN_KEY = "admin-secret-key-0003"


def partner_yaml(
    *,
    acme_map: str = "acme-new-vehicles",
    destination: str = "",
    acme_extra: str = "",
) -> str:
    """acme-dsp sees intent + the composite (vendor segtax, mapped ids, buyeruid via sync);
    beta-ssp sees only geo (IAB segtax 4, our cookie id in user.id or eids)."""
    return f"""# Test partners
partners:
  - partner_id: acme-dsp
    kind: dsp
    api_key_sha256: {hash_api_key(ACME_KEY)}
    granted_segments: [auto_new_car_intent, new_car_socal]
    segment_id_map:
      auto_new_car_intent: {acme_map}
      new_car_socal: acme-socal-dealers
    output_format: openrtb
    segtax: 600
    data_provider_id: dmp.example
    data_provider_name: Example DMP
    max_segments: 10
    user_id_sources: [buyeruid, cookie]
    sync_url: "https://sync.acme.example/match?dmp=${{UID}}&gdpr=${{GDPR}}&gdpr_consent=${{GDPR_CONSENT}}"
    prebid_bidder: acme
{acme_extra}{destination}
  - partner_id: beta-ssp
    kind: ssp
    api_key_sha256: {hash_api_key(BETA_KEY)}
    granted_segments: [geo_socal]
    segment_id_map: {{geo_socal: "56"}}
    output_format: ids
    segtax: 4
    data_provider_id: dmp.example
    data_provider_name: Example DMP
    max_segments: 5
    user_id_sources: [cookie, eids]
    eids_sources: [dmp.example]
    prebid_bidder: beta
"""


def write_partners(path: Path, text: str) -> Path:
    """Replace the file the way editors and config management do: write aside, rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path

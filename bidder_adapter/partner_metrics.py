"""Prometheus metrics of the partner endpoints, on the registry the lookup app already serves."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class PartnerMetrics:
    registry: CollectorRegistry
    answers: Counter
    config_reloads: Counter
    config_partners: Gauge
    config_info: Gauge
    syncs: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> PartnerMetrics:
        r = registry or CollectorRegistry()
        return cls(
            registry=r,
            answers=Counter(
                "dmp_partner_answers_total",
                "Partner answers by endpoint and outcome (enriched, no_user, gdpr, tmax, ...).",
                ["partner", "endpoint", "outcome"],
                registry=r,
            ),
            config_reloads=Counter(
                "dmp_partner_config_reloads_total",
                "Partner file reloads by result (ok, unchanged, error).",
                ["result"],
                registry=r,
            ),
            config_info=Gauge(
                "dmp_partner_config_info",
                "1 for the partner-profile version in force (label: its hash prefix).",
                ["version"],
                registry=r,
            ),
            config_partners=Gauge(
                "dmp_partner_config_partners", "Partners in the configuration in force.", registry=r
            ),
            syncs=Counter(
                "dmp_partner_syncs_total",
                "ID sync pixel calls by partner, direction (in, out) and result.",
                ["partner", "direction", "result"],
                registry=r,
            ),
        )

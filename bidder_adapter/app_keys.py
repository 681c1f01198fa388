"""Typed keys under which the partner endpoints keep their state on the lookup app."""

from __future__ import annotations

from aiohttp import web

from bidder_adapter.answer import Answerer
from bidder_adapter.partner_metrics import PartnerMetrics
from bidder_adapter.partner_registry import PartnerRegistry
from dmp.config import Settings
from dmp.match_table import MatchTable, MatchTableStore
from dmp.match_table_follower import MatchTableFollower, MatchTableMetrics

PARTNER_SETTINGS = web.AppKey("partner_settings", Settings)
PARTNERS = web.AppKey("partners", PartnerRegistry)
PARTNER_METRICS = web.AppKey("partner_metrics", PartnerMetrics)
MATCH_TABLE = web.AppKey("match_table", MatchTable)
MATCH_STORE = web.AppKey("match_store", MatchTableStore)
MATCH_METRICS = web.AppKey("match_metrics", MatchTableMetrics)
MATCH_FOLLOWER = web.AppKey("match_follower", MatchTableFollower)
ANSWERER = web.AppKey("answerer", Answerer)
OPENAPI = web.AppKey("openapi", bytes)

"""Credentials and TLS for the connections to Kafka (SASL, SSL) built from the settings.

Redis takes its password, ACL user and TLS from the URL itself (``redis://user:pass@host``,
``rediss://host?ssl_ca_certs=/path``), which redis-py parses; see docs/security.md.
"""

from __future__ import annotations

import ssl
from typing import Any

from dmp.config import KafkaSettings

PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def kafka_security_options(k: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for every aiokafka client (consumer, producer, admin)."""
    protocol = k.security_protocol.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"DMP_KAFKA_SECURITY_PROTOCOL={k.security_protocol!r}: one of {PROTOCOLS}")
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        if k.sasl_mechanism not in MECHANISMS:
            raise ValueError(f"DMP_KAFKA_SASL_MECHANISM={k.sasl_mechanism!r}: one of {MECHANISMS}")
        if not k.sasl_username:
            raise ValueError(f"{protocol} needs DMP_KAFKA_SASL_USERNAME and _PASSWORD")
        options.update(
            sasl_mechanism=k.sasl_mechanism,
            sasl_plain_username=k.sasl_username,
            sasl_plain_password=k.sasl_password,
        )
    if protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=k.ssl_cafile or None)
        if k.ssl_certfile:
            context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile or None)
        options["ssl_context"] = context
    return options

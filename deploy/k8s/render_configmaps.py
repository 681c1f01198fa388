"""Write the ConfigMaps that carry repository files (rules, Prometheus config and rules).

    python deploy/k8s/render_configmaps.py          # rewrite them
    python deploy/k8s/render_configmaps.py --check  # exit 1 if they drifted (the tests run this)

The files stay the single source: segment_rules/examples/segments.yaml and
deploy/prometheus/rules/*.yml.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "k8s"

PARTNERS = f"""# Example partner file (docs/partners.md). Replace the key hash with your partner's:
# printf %s "$KEY" | sha256sum
partners:
  - partner_id: example-dsp
    kind: dsp
    api_key_sha256: {hashlib.sha256(b"replace-me").hexdigest()}
    granted_segments: [auto_new_car_intent, new_car_socal]
    output_format: openrtb
    segtax: 4
    data_provider_id: dmp.example
    data_provider_name: Example DMP
    max_segments: 10
    user_id_sources: [cookie]
"""

PROMETHEUS = """global:
  scrape_interval: 15s
  evaluation_interval: 15s
  scrape_timeout: 5s
rule_files:
  - /etc/prometheus/rules/*.yml
scrape_configs:
  # Pods that ask for it with the prometheus.io/* annotations (see the Deployments); the
  # job label is the pod's app.kubernetes.io/name (dmp-ingest, dmp-lookup, dmp-destinations),
  # as the rules expect.
  - job_name: dmp-pods
    kubernetes_sd_configs:
      - role: pod
        namespaces:
          names: [dmp]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
        action: replace
        regex: ([^:]+)(?::\\d+)?;(\\d+)
        replacement: $1:$2
        target_label: __address__
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        action: replace
        regex: (.+)
        target_label: __metrics_path__
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name]
        target_label: job
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: instance
"""


def _block(text: str, indent: int = 4) -> str:
    pad = " " * indent
    return "".join(f"{pad}{line}\n" if line else "\n" for line in text.rstrip("\n").split("\n"))


def _configmap(name: str, files: dict[str, str]) -> str:
    data = "".join(f"  {key}: |\n{_block(text)}" for key, text in files.items())
    return (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
        f"  name: {name}\n  namespace: dmp\n  labels:\n    app.kubernetes.io/part-of: dmp\n"
        f"data:\n{data}"
    )


def rules_and_partners() -> str:
    rules = (ROOT / "segment_rules" / "examples" / "segments.yaml").read_text()
    return (
        "# Written by deploy/k8s/render_configmaps.py: the rule file and an example partner file,\n"
        "# mounted at /etc/dmp/rules and /etc/dmp/partners. In production make them from yours:\n"
        "#   kubectl -n dmp create configmap dmp-rules --from-file=segments.yaml=my-rules.yaml \\\n"
        "#     --dry-run=client -o yaml | kubectl apply -f -\n"
        "# Rules are read at start: after a change restart ingest, then lookup (docs/operations.md).\n"
        "# The lookup pods reload the partner file by themselves.\n"
        + _configmap("dmp-rules", {"segments.yaml": rules})
        + "---\n"
        + _configmap("dmp-partners", {"partners.yaml": PARTNERS})
    )


def prometheus() -> str:
    rule_files = {
        p.name: p.read_text()
        for p in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
    }
    return (
        "# Written by deploy/k8s/render_configmaps.py: Prometheus inside the cluster, its config\n"
        "# (pods found by annotation) and the rules of deploy/prometheus/rules/. Mount\n"
        "# dmp-prometheus-config at /etc/prometheus and dmp-prometheus-rules at\n"
        "# /etc/prometheus/rules. Prometheus needs RBAC to list pods in the dmp namespace (not\n"
        "# included: it depends on how Prometheus is run).\n"
        + _configmap("dmp-prometheus-config", {"prometheus.yml": PROMETHEUS})
        + "---\n"
        + _configmap("dmp-prometheus-rules", rule_files)
    )


OUTPUTS = {"rules-and-partners.yaml": rules_and_partners, "prometheus.yaml": prometheus}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    drifted = []
    for name, render in OUTPUTS.items():
        path = HERE / name
        text = render()
        if check:
            if not path.exists() or path.read_text() != text:
                drifted.append(name)
        else:
            path.write_text(text)
    if drifted:
        print(
            f"out of date: {', '.join(drifted)}; run python deploy/k8s/render_configmaps.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Generate examples/issues.json: Antrea-like GitHub issues in the seed's raw format, and
examples/preferences.jsonl: preference pairs over the first 60 of them for ``method: dpo``.

Written for this project (no real issue text). Each label has its own components, symptoms and
commands, so a small model can learn the mapping in minutes; about one record in five has two
labels. Deterministic: ``python3 examples/make_issues.py`` rewrites the same file.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

LABELS = {
    "agent": dict(
        things=[
            "antrea-agent",
            "the agent's NodeRouteController",
            "agent restart logic",
            "the agent's health check",
            "agent memory usage",
            "the agent's gateway interface setup",
        ],
        symptoms=[
            "crashes with a nil pointer dereference",
            "leaks goroutines after a few days",
            "takes 3 minutes to become ready",
            "keeps restarting with CrashLoopBackOff",
            "logs 'failed to initialize' on startup",
        ],
        detail=[
            "The antrea-agent Pod on the Node shows {n} restarts.",
            "kubectl logs -n kube-system antrea-agent-xyz shows a stack trace.",
            "This happens after upgrading the agent DaemonSet.",
        ],
    ),
    "antctl": dict(
        things=[
            "antctl get podinterface",
            "antctl supportbundle",
            "antctl traceflow",
            "antctl get featuregates",
            "antctl version output",
            "antctl query endpoint",
        ],
        symptoms=[
            "prints an empty table",
            "fails with 'unknown flag'",
            "times out when the cluster is large",
            "returns exit code 0 on error",
            "shows the wrong column headers",
        ],
        detail=[
            "Running `{cmd}` from outside the cluster gives this result.",
            "The antctl binary is version v1.{n}.0.",
            "The same antctl command works inside the agent container.",
        ],
    ),
    "cni": dict(
        things=[
            "the CNI ADD command",
            "CNI DEL for terminated Pods",
            "the CNI plugin binary",
            "IPAM allocation in the CNI",
            "the CNI config file 10-antrea.conflist",
            "CNI result caching",
        ],
        symptoms=[
            "returns 'failed to allocate IP' for new Pods",
            "leaves stale interfaces behind",
            "hangs when the container runtime retries",
            "is not idempotent",
            "writes an invalid conflist",
        ],
        detail=[
            "kubelet reports NetworkPluginNotReady for {n} seconds.",
            "The Pod sandbox creation fails with a CNI error.",
            "containerd logs show the CNI call timing out.",
        ],
    ),
    "multi-cluster": dict(
        things=[
            "the multi-cluster leader controller",
            "ResourceExport for Services",
            "ClusterSet membership",
            "the multi-cluster gateway",
            "ServiceImport in member clusters",
            "cross-cluster Endpoint sync",
        ],
        symptoms=[
            "does not sync after the leader restarts",
            "reports the ClusterSet as not ready",
            "exports stale Endpoints",
            "drops traffic between member clusters",
            "fails to elect a gateway Node",
        ],
        detail=[
            "We have {n} member clusters joined to one leader.",
            "The ResourceImport objects are never created.",
            "antrea-mc-controller logs show a conflict error.",
        ],
    ),
    "network-policy": dict(
        things=[
            "ClusterNetworkPolicy with namespaceSelector",
            "NetworkPolicy egress rules",
            "Antrea-native policy tiers",
            "the FQDN policy rule",
            "policy audit logging",
            "AdminNetworkPolicy priority",
        ],
        symptoms=[
            "does not drop traffic it should deny",
            "allows traffic from a Pod outside the selector",
            "is realized on only some Nodes",
            "logs the wrong rule name",
            "ignores the port range",
        ],
        detail=[
            "kubectl get acnp shows the policy as realized on {n} of 5 Nodes.",
            "The Deny rule has priority 10 in the Application tier.",
            "Traffic is allowed even though the ingress rule selects no peers.",
        ],
    ),
    "ovs": dict(
        things=[
            "the OVS bridge br-int",
            "OpenFlow flows in table 20",
            "ovs-vswitchd",
            "the OVS datapath",
            "OVS group buckets",
            "the OVS tunnel port antrea-tun0",
        ],
        symptoms=[
            "uses 100% CPU",
            "loses flows after ovs-vswitchd restarts",
            "installs duplicate flows",
            "fails to reconnect to the OVSDB server",
            "drops packets with a large MTU",
        ],
        detail=[
            "ovs-ofctl dump-flows br-int shows {n} stale flows.",
            "ovs-vsctl show lists the port twice.",
            "The OVS kernel module version is 2.{n}.",
        ],
    ),
    "proxy": dict(
        things=[
            "AntreaProxy",
            "Service ClusterIP load balancing",
            "NodePort Services",
            "proxyAll mode",
            "LoadBalancer Service ingress IPs",
            "sessionAffinity ClientIP",
        ],
        symptoms=[
            "sends traffic to terminated Endpoints",
            "does not balance across all Endpoints",
            "breaks when kube-proxy is removed",
            "ignores externalTrafficPolicy Local",
            "times out for the first request",
        ],
        detail=[
            "The Service has {n} Endpoints but only one receives requests.",
            "skipServices is set in the antrea-agent config.",
            "curl to the ClusterIP from a Pod hangs.",
        ],
    ),
    "windows": dict(
        things=[
            "Antrea on Windows Nodes",
            "the Windows HNS network",
            "the Windows installation script",
            "containerd on Windows",
            "the Windows OVS extension",
            "Windows host-network Pods",
        ],
        symptoms=[
            "fails to create the HNS endpoint",
            "loses connectivity after a Node reboot",
            "cannot pull the antrea-windows image",
            "reports the wrong Node IP",
            "fails Install-AntreaAgent.ps1",
        ],
        detail=[
            "The Node runs Windows Server 2022, build {n}.",
            "Get-HnsNetwork shows no antrea-hnsnetwork.",
            "The PowerShell script stops at the OVS service step.",
        ],
    ),
}
PAIRS = [
    ("proxy", "windows"),
    ("network-policy", "agent"),
    ("ovs", "windows"),
    ("cni", "agent"),
    ("multi-cluster", "proxy"),
    ("ovs", "agent"),
    ("antctl", "network-policy"),
    ("cni", "windows"),
]
KINDS = ["**Describe the bug**", "**What happened**", "**Problem**"]
ASKS = [
    "**Expected**\r\n\r\nIt should keep working.",
    "**To Reproduce**\r\n\r\n1. Deploy Antrea\r\n2. Wait a few minutes",
    "**Versions:**\r\n\r\n - Antrea version: v1.{n}.1",
]


def body_for(rng: random.Random, labels: list[str]) -> tuple[str, str]:
    first = LABELS[labels[0]]
    title = f"{rng.choice(first['things'])} {rng.choice(first['symptoms'])}"
    if len(labels) > 1:
        title += " on " + rng.choice(LABELS[labels[1]]["things"])
    parts = [rng.choice(KINDS)]
    for label in labels:
        d = LABELS[label]
        parts.append(rng.choice(d["detail"]).format(n=rng.randint(2, 14), cmd=rng.choice(LABELS["antctl"]["things"])))
        parts.append(f"It looks like {rng.choice(d['things'])} {rng.choice(d['symptoms'])}.")
    parts.append(rng.choice(ASKS).format(n=rng.randint(10, 16)))
    return title[0].upper() + title[1:], "\r\n\r\n".join(parts)


def main() -> None:
    rng = random.Random(20261127)
    plan: list[list[str]] = []
    for label in LABELS:
        plan += [[label]] * 20
    for pair in PAIRS:
        plan += [list(pair)] * 5
    rng.shuffle(plan)
    records: list[dict] = []
    seen: set = set()
    for labels in plan:
        while True:
            title, body = body_for(rng, labels)
            if title + body not in seen:
                seen.add(title + body)
                break
        records.append(
            {
                "id": f"identity_{len(records) + 1}",
                "conversations": [
                    {"from": "human", "value": f"title: {title} body: {body}"},
                    {"from": "gpt", "value": str(labels)},
                ],
            }
        )
    out = Path(__file__).with_name("issues.json")
    out.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} records to {out}")
    write_preferences(records[:60], rng)


def write_preferences(records: list[dict], rng: random.Random) -> None:
    """Each issue's true labels preferred to a wrong answer, in TRL's format with an explicit
    prompt (``prepare`` converts it to OpenAI's): the wrong answer is the label most often
    paired with the issue's first one (the confusable one) or, for an issue with two labels,
    the first alone (the habit DPO corrects: answering one label where two are due)."""
    partner = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
    lines = []
    for r in records:
        prompt, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        labels = ast.literal_eval(answer)  # our own str(list) above
        if len(labels) > 1:
            wrong = [labels[0]]
        else:
            others = [x for x in LABELS if x != labels[0]]
            wrong = [partner.get(labels[0]) or rng.choice(others)]
        pair = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": str(wrong)}],
        }
        lines.append(json.dumps(pair, ensure_ascii=False))
    out = Path(__file__).with_name("preferences.jsonl")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} preference pairs to {out}")


if __name__ == "__main__":
    main()

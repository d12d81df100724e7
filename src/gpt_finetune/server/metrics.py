"""``GET /metrics``: the server's figures in Prometheus' text format (prometheus_client).

Two kinds. What the store knows (jobs by status, the queue and its oldest wait, tokens trained,
workers by state) is read from it at each scrape by a collector, so every server of a shared
store reports the same queue, whichever machine trains the jobs; a scrape costs a few indexed
queries. What only this process sees (chat latency, chat requests waiting and running in its
engine) is measured here. Each app has its own registry: several apps in one process (the tests)
do not mix their counts. The endpoint takes the API key like every other route when the server
has keys (Prometheus sends it with ``authorization: {credentials: KEY}``).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..contract import JobStatus
from ..services import Services

# chat answers on a CPU take seconds; on a GPU, tens of milliseconds
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class StoreCollector:
    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Any:
        store, t = self.services.store, time.time()
        by_status = {s.value: 0 for s in JobStatus}
        for row in store.query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            by_status[row["status"]] = int(row["n"])
        jobs = GaugeMetricFamily("gpt_finetune_jobs", "fine-tuning jobs by status", labels=["status"])
        for status, n in sorted(by_status.items()):
            jobs.add_metric([status], n)
        yield jobs
        queued = store.query(
            "SELECT COUNT(*) AS n, MIN(COALESCE(queued_at, created_at)) AS oldest FROM jobs WHERE status = ?",
            (JobStatus.QUEUED.value,),
        )[0]
        yield GaugeMetricFamily("gpt_finetune_queue_length", "jobs waiting for a worker", value=int(queued["n"]))
        oldest = queued["oldest"]
        yield GaugeMetricFamily(
            "gpt_finetune_queue_oldest_wait_seconds",
            "how long the longest-waiting queued job has waited (0: none waits)",
            value=max(0.0, t - oldest) if oldest is not None else 0.0,
        )
        tokens = store.query(
            "SELECT COALESCE(SUM(trained_tokens), 0) AS n FROM jobs WHERE status = ?", (JobStatus.SUCCEEDED.value,)
        )
        yield CounterMetricFamily(
            "gpt_finetune_tokens_trained", "tokens trained by the jobs that succeeded", value=int(tokens[0]["n"])
        )
        workers = GaugeMetricFamily("gpt_finetune_workers", "workers by state (the last day's)", labels=["state"])
        counts = {"busy": 0, "idle": 0, "lost": 0, "stopped": 0}
        for row in self.services.workers.listing(include_gone=True):
            counts[row["state"]] += 1
        for state, n in counts.items():
            workers.add_metric([state], n)
        yield workers
        chat = self.services.chat
        yield GaugeMetricFamily("gpt_finetune_chat_queued_requests", "chat requests waiting", value=chat.pending())
        yield GaugeMetricFamily("gpt_finetune_chat_running_requests", "chat requests answering", value=chat.running())


class Metrics:
    """One app's registry, and the chat figures its routes record."""

    def __init__(self, services: Services) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(services))  # type: ignore[arg-type]
        self.chat_seconds = Histogram(
            "gpt_finetune_chat_request_seconds",
            "chat completions, from the request to the whole answer (streams: to the last chunk)",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token_seconds = Histogram(
            "gpt_finetune_chat_first_chunk_seconds",
            "streamed chat completions, from the request to the first chunk",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.chat_requests = Counter(
            "gpt_finetune_chat_requests", "chat completions by outcome", ["outcome"], registry=self.registry
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

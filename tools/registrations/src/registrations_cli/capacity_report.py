"""`registrations capacity`: the capacity model's plan, as a table or a JSON document.

It reads no environment and connects to nothing: it is arithmetic on its arguments and on the
per-unit figures measured by `make bench` (docs/capacity.md)."""

from __future__ import annotations

from typing import Any

from .capacity import Adaptive, Fixed, Plan
from .output import Output


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _schedule_text(plan: Plan) -> str:
    s = plan.schedule
    if isinstance(s, Fixed):
        return f"fixed schedule (first poll at {s.first_delay_s:g} s, then every {s.interval_s:g} s)"
    return f"adaptive schedule (target delay {s.target_delay_s:.3g} s, at most {s.max_polls:g} polls)"


def rows(plan: Plan) -> list[list[str]]:
    p, f = plan.polling, plan.figures
    sub, poll = plan.submitter, plan.poller
    target = ""
    if plan.target_met is False:
        target = " (above the target: capped by the polls)"
    return [
        ["polls per registration", f"{p.polls:.2f}", ""],
        ["mean detection delay", f"{p.delay_s:.2f}", "s" + target],
        ["time in system", f"{p.time_in_system_s:.2f}", "s"],
        ["registrations in flight", _count(plan.in_flight), "(messages held by the broker)"],
        ["timed out at the deadline", f"{100 * p.timed_out:.3f}", "%"],
        ["legacy requests", _rate(plan.legacy_requests_per_s), "/s"],
        ["legacy POST requests", _rate(plan.legacy_posts_per_s), "/s"],
        ["legacy status GETs", _rate(plan.legacy_polls_per_s), "/s"],
        ["legacy calls in progress", f"{plan.legacy_requests_per_s * f.legacy_call_s:,.1f}",
         f"(at {1000 * f.legacy_call_s:g} ms a call)"],
        ["broker messages", _rate(plan.broker_messages_per_s), "/s"],
        ["broker: published", _rate(plan.broker_published_per_s), "/s"],
        ["broker: dead-lettered", _rate(plan.broker_dead_lettered_per_s), "/s"],
        ["broker: delivered", _rate(plan.broker_delivered_per_s), "/s"],
        ["broker: into pending", _rate(plan.pending_enqueued_per_s), "/s (as many delivered from it)"],
        ["broker: into wait queues", _rate(plan.wait_enqueued_per_s), "/s"],
        ["broker CPU", f"{plan.broker_cores:.2f}", "cores (one node; a cluster: docs/capacity.md)"],
        ["MongoDB writes", _rate(plan.mongodb_writes_per_s), "/s"],
        ["MongoDB reads", _rate(plan.mongodb_reads_per_s), "/s"],
        ["submitter CPU", f"{sub.cores:.2f}", "cores"],
        ["submitter replicas", str(sub.needed), f"(by CPU {sub.by_cpu}, by workers {sub.by_workers})"],
        ["poller CPU", f"{poll.cores:.2f}", "cores"],
        ["poller replicas", str(poll.needed), f"(by CPU {poll.by_cpu}, by workers {poll.by_workers})"],
    ]


def document(plan: Plan) -> dict[str, Any]:
    p, f, s = plan.polling, plan.figures, plan.schedule
    schedule: dict[str, Any]
    if isinstance(s, Fixed):
        schedule = {"kind": "fixed", "first_delay_s": s.first_delay_s, "interval_s": s.interval_s}
    else:
        assert isinstance(s, Adaptive)
        schedule = {"kind": "adaptive", "target_delay_s": round(s.target_delay_s, 6), "max_polls": s.max_polls,
                    "first_hops": s.first_hops}

    def replicas(r: Any) -> dict[str, Any]:
        return {"cores": round(r.cores, 3), "replicas": r.needed, "replicas_by_cpu": r.by_cpu,
                "replicas_by_workers": r.by_workers}

    return {
        "inputs": {
            "rate_per_s": plan.rate, "latency": str(plan.latency), "schedule": schedule,
            "deadline_s": plan.deadline_s, "failed_share": plan.failed_share,
            "figures": {"submitter_ms_per_registration": f.submitter_ms_per_registration,
                        "poller_ms_per_message": f.poller_ms_per_message,
                        "broker_ms_per_message": f.broker_ms_per_message, "utilization": f.utilization,
                        "submitter_workers": f.submitter_workers, "poller_workers": f.poller_workers,
                        "legacy_call_s": f.legacy_call_s},
        },
        "latency": {"mean_s": round(plan.latency.mean, 3), "median_s": round(plan.latency.quantile(0.5), 3)},
        "polling": {
            "polls_per_registration": round(p.polls, 3), "detection_delay_mean_s": round(p.delay_s, 3),
            "target_met": plan.target_met, "time_in_system_s": round(p.time_in_system_s, 3),
            "timed_out_share": round(p.timed_out, 6), "first_poll_ages_s": [round(a, 2) for a in p.poll_ages_s[:8]],
            "wait_hops_per_registration": round(p.wait_hops, 3),
            "pending_handoffs_per_registration": round(p.pending_handoffs, 3),
        },
        "in_flight": round(plan.in_flight),
        "legacy": {"requests_per_s": round(plan.legacy_requests_per_s, 1),
                   "posts_per_s": round(plan.legacy_posts_per_s, 1),
                   "polls_per_s": round(plan.legacy_polls_per_s, 1),
                   "calls_in_progress": round(plan.legacy_requests_per_s * f.legacy_call_s, 1)},
        "broker": {"messages_per_s": round(plan.broker_messages_per_s, 1),
                   "published_per_s": round(plan.broker_published_per_s, 1),
                   "dead_lettered_per_s": round(plan.broker_dead_lettered_per_s, 1),
                   "delivered_per_s": round(plan.broker_delivered_per_s, 1),
                   "pending_enqueued_per_s": round(plan.pending_enqueued_per_s, 1),
                   "wait_enqueued_per_s": round(plan.wait_enqueued_per_s, 1),
                   "cores": round(plan.broker_cores, 3)},
        "mongodb": {"writes_per_s": round(plan.mongodb_writes_per_s, 1),
                    "reads_per_s": round(plan.mongodb_reads_per_s, 1)},
        "submitter": replicas(plan.submitter),
        "poller": replicas(plan.poller),
    }


def run(plan: Plan, out: Output) -> int:
    if not out.is_table:
        out.document(document(plan))
        return 0
    latency = plan.latency
    out.summary(f"{_rate(plan.rate)} registrations/s, latency {latency} (mean {latency.mean:.3g} s, "
                f"median {latency.quantile(0.5):.3g} s), {_schedule_text(plan)}, deadline {plan.deadline_s:g} s")
    out.summary("")
    out.line(out.table(["QUANTITY", "VALUE", "UNIT"], rows(plan), right=["VALUE"]))
    f = plan.figures
    out.summary("")
    out.summary(f"replicas planned at {f.utilization:.0%} of one core and of their workers "
                f"({f.submitter_workers} submitter, {f.poller_workers} poller); per-unit CPU: submitter "
                f"{f.submitter_ms_per_registration:g} ms/registration, poller {f.poller_ms_per_message:g} ms/message, "
                f"broker {f.broker_ms_per_message:g} ms/message (measured by make bench: docs/capacity.md)")
    return 0

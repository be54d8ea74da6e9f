"""Unit tests of the scaling rules in replay.py (autoscale/run.sh runs them; by hand:
cd loadtest/autoscale && ../../.venv/bin/python -m unittest test_replay).

Expected numbers are worked out by hand from KEDA's scaling executor and the HPA controller's rules
(summed up in the chart README's "The math"); the README's own example (132 tasks, target 16 -> 9)
is one.
"""

import unittest
from types import SimpleNamespace

import replay
from replay import Formula, Hpa, Keda, Policy, Rules, Setup, Trigger, Worker, pick_victims


def setup(behavior=True, min_replicas=1, max_replicas=20, target=16.0, cooldown=300.0):
    return Setup(
        source="test",
        polling=15.0,
        cooldown=cooldown,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        triggers=[Trigger("pending", "p", target, 0), Trigger("inflight", "a", target, 0)],
        formula=Formula("pending + inflight"),
        target=target,
        activation_target=0.0,
        metric_type="AverageValue",
        behavior={
            "up": Rules(0.0, "Max", [Policy("Percent", 100, 15), Policy("Pods", 4, 15)]),
            "down": Rules(300.0, "Max", [Policy("Percent", 25, 60)]),
        }
        if behavior
        else None,
        grace=130.0,
        drain_timeout=100,
        worker_env={},
    )


def hpa_step(h, now, spec, composite, status=None):
    return h.reconcile(now, spec, spec if status is None else status, spec, {}, composite)[0]


class FormulaTest(unittest.TestCase):
    def test_sum_and_ternary(self):
        self.assertEqual(Formula("pending + inflight").eval({"pending": 100, "inflight": 32}), 132)
        f = Formula("(pending + inflight) * (latency > 30 ? 2 : 1)")
        self.assertEqual(f.eval({"pending": 3, "inflight": 1, "latency": 31}), 8)
        self.assertEqual(f.eval({"pending": 3, "inflight": 1, "latency": 30}), 4)
        self.assertEqual(Formula("-a + b * 2 - (c - 1)").eval({"a": 1, "b": 3, "c": 2}), 4)

    def test_bad_formula(self):
        with self.assertRaises(ValueError):
            Formula("pending +")
        with self.assertRaises(ValueError):
            Formula("pending + inflight").eval({"pending": 1})


class HpaTest(unittest.TestCase):
    def test_average_value_and_tolerance(self):
        h = Hpa(setup())
        self.assertEqual(h.proposals({}, 132, 1, 1), 9)  # README: ceil(132 / 16)
        self.assertEqual(h.proposals({}, 160, 10, 10), 10)  # busy fleet with an empty list holds
        self.assertEqual(h.proposals({}, 68, 4, 4), 4)  # 68 / 64 = 1.0625: within 10 %
        self.assertEqual(h.proposals({}, 72, 4, 4), 5)  # 72 / 64 = 1.125: outside
        self.assertEqual(h.proposals({}, 0, 3, 3), 0)

    def test_zero_replicas_is_keda_business(self):
        h = Hpa(setup())
        self.assertEqual(hpa_step(h, 0, 0, 500), 0)

    def test_behavior_scale_up_rate(self):
        h = Hpa(setup())
        # from 1: max(ceil(1 * 2), 1 + 4) = 5
        self.assertEqual(hpa_step(h, 0, 1, 20 * 16), 5)
        # 5 s later the period (15 s) still holds the +4: start 1 again, limit 5
        self.assertEqual(hpa_step(h, 5, 5, 20 * 16), 5)
        # 15 s after the first step: start 5, max(10, 9) = 10
        self.assertEqual(hpa_step(h, 15, 5, 20 * 16), 10)
        self.assertEqual(hpa_step(h, 30, 10, 20 * 16), 20)
        self.assertEqual(hpa_step(h, 45, 20, 40 * 16), 20)  # maxReplicaCount

    def test_behavior_scale_down_window_and_rate(self):
        h = Hpa(setup())
        self.assertEqual(hpa_step(h, 0, 20, 20 * 16), 20)
        # load gone: the highest recommendation of the last 300 s (20) wins
        self.assertEqual(hpa_step(h, 15, 20, 0), 20)
        self.assertEqual(hpa_step(h, 299, 20, 0), 20)
        # window passed: 25 % per 60 s, truncated: 20 -> 15
        self.assertEqual(hpa_step(h, 301, 20, 0), 15)
        self.assertEqual(hpa_step(h, 316, 15, 0), 15)  # same period: start 20, limit 15
        self.assertEqual(hpa_step(h, 362, 15, 0), 11)  # int(15 * 0.75)
        self.assertEqual(hpa_step(h, 423, 11, 0), 8)
        self.assertEqual(hpa_step(h, 484, 8, 0), 6)

    def test_scale_down_never_below_min(self):
        h = Hpa(setup(min_replicas=2))
        self.assertEqual(hpa_step(h, 0, 2, 0), 2)
        h = Hpa(setup(min_replicas=0))
        self.assertEqual(hpa_step(h, 0, 1, 0), 1)  # HPA min is max(1, minReplicaCount)

    def test_legacy_without_behavior(self):
        h = Hpa(setup(behavior=False))
        self.assertEqual(hpa_step(h, 0, 1, 100 * 16), 4)  # max(2 * 1, 4)
        self.assertEqual(hpa_step(h, 15, 4, 100 * 16), 8)
        self.assertEqual(hpa_step(h, 30, 8, 100 * 16), 16)
        self.assertEqual(hpa_step(h, 45, 16, 100 * 16), 20)
        # 5-minute stabilization, then straight down (no scale-down rate limit)
        self.assertEqual(hpa_step(h, 60, 20, 0), 20)
        self.assertEqual(hpa_step(h, 344, 20, 0), 20)
        self.assertEqual(hpa_step(h, 346, 20, 0), 1)


class KedaTest(unittest.TestCase):
    def test_zero_to_one_and_cooldown(self):
        k = Keda(setup(min_replicas=0, cooldown=60))
        self.assertIsNone(k.poll(0, False, 0))
        self.assertEqual(k.poll(10, True, 0), 1)
        self.assertIsNone(k.poll(20, True, 3))  # 1 <-> N is the HPA's
        self.assertIsNone(k.poll(50, False, 3))  # inactive, cooldown not over
        self.assertEqual(k.poll(81, False, 3), 0)

    def test_min_one_never_zero(self):
        k = Keda(setup(min_replicas=1))
        self.assertIsNone(k.poll(1000, False, 1))
        self.assertEqual(k.poll(1001, False, 0), 1)


class VictimTest(unittest.TestCase):
    def test_replicaset_order(self):
        proc = SimpleNamespace()
        old_ready = Worker(1, created=0, start_at=0, proc=proc, ready_at=1)
        new_ready = Worker(2, created=5, start_at=5, proc=proc, ready_at=6)
        not_ready = Worker(3, created=2, start_at=2, proc=proc, ready_at=None)
        unstarted = Worker(4, created=1, start_at=99, proc=None)
        live = [old_ready, new_ready, not_ready, unstarted]
        self.assertEqual([w.n for w in pick_victims(live, 4)], [4, 3, 2, 1])
        self.assertEqual([w.n for w in pick_victims(live, 1)], [4])


class ChartTest(unittest.TestCase):
    def test_values_fallback_matches_chart_defaults(self):
        from pathlib import Path

        chart = Path(replay.__file__).resolve().parents[2] / "deploy/helm/agentq"
        s = replay.setup_from_values(chart, [], ["worker.concurrency=4"])
        self.assertEqual(s.target, 4)
        self.assertEqual([t.key for t in s.triggers], ["agentq:{default}:pending", "agentq:{default}:active"])
        self.assertEqual(s.grace, 130)
        self.assertEqual(s.behavior["down"].policies[0].kind, "Percent")


UPSTREAMS = {
    "upstreams": [
        {"name": "a", "base_url": "https://api.example/v1", "api_key": "env:A_KEY", "models": ["m1", "m2"],
         "limits": {"rpm": 500, "tpm": 200000}, "model_limits": {"m2": {"rpm": 100, "concurrency": 3}}},
        {"name": "b", "base_url": "https://b.example/v1", "models": ["m3"]},
    ]
}


class QuotaTest(unittest.TestCase):
    def test_localize_points_every_upstream_at_the_mock(self):
        local = replay.localize_upstreams(UPSTREAMS, "http://127.0.0.1:9/v1")
        self.assertEqual([u["base_url"] for u in local["upstreams"]], ["http://127.0.0.1:9/v1"] * 2)
        self.assertEqual(local["upstreams"][0]["api_key"], "env:OPENAI_API_KEY")
        self.assertNotIn("api_key", local["upstreams"][1])  # no key stays no key
        self.assertEqual(local["upstreams"][0]["model_limits"], UPSTREAMS["upstreams"][0]["model_limits"])
        self.assertEqual(UPSTREAMS["upstreams"][0]["base_url"], "https://api.example/v1")  # input untouched

    def test_quota_is_the_tightest_of_upstream_and_model(self):
        self.assertEqual(replay.quota_for(UPSTREAMS, "m1"), replay.Quota("a", rpm=500, tpm=200000))
        self.assertEqual(replay.quota_for(UPSTREAMS, "m2"), replay.Quota("a", rpm=100, tpm=200000, concurrency=3))
        self.assertEqual(replay.quota_for(UPSTREAMS, "m3"), replay.Quota("b"))
        self.assertIsNone(replay.quota_for(UPSTREAMS, "m4"))
        self.assertIsNone(replay.quota_for(None, "m1"))

    def test_useful_capacity_chart_readme_example(self):
        # README "Scaling under a provider's rate limit": TPM 200,000, RPM 500, 1,000 tokens, 4 s,
        # concurrency 16 -> 3.33 tasks/s, 13.3 in flight, 1 replica
        c = replay.useful_capacity(replay.Quota("a", rpm=500, tpm=200000), 4.0, 16, 1000)
        self.assertAlmostEqual(c.rate, 200 / 60)
        self.assertAlmostEqual(c.in_flight, 200 / 60 * 4)
        self.assertEqual(c.replicas, 1)
        # without a token figure the TPM cannot be used: RPM alone, 33.3 in flight -> 3 replicas
        self.assertEqual(replay.useful_capacity(replay.Quota("a", rpm=500, tpm=200000), 4.0, 16).replicas, 3)

    def test_useful_capacity_of_the_scenario(self):
        c = replay.useful_capacity(replay.Quota("mock", rpm=2100), 0.2, 4)
        self.assertAlmostEqual(c.rate, 35)
        self.assertAlmostEqual(c.in_flight, 7)
        self.assertEqual(c.replicas, 2)
        # 2400 rpm is exactly 8 calls in flight = 2 workers of 4, not 3 (float noise)
        self.assertEqual(replay.useful_capacity(replay.Quota("mock", rpm=2400), 0.2, 4).replicas, 2)
        # a concurrency limit binds below the rate
        c = replay.useful_capacity(replay.Quota("a", rpm=6000, concurrency=3), 0.2, 4)
        self.assertEqual((c.in_flight, c.replicas), (3.0, 1))
        self.assertAlmostEqual(c.rate, 15)
        self.assertIsNone(replay.useful_capacity(replay.Quota("b"), 0.2, 4))

    def test_backlogged_pace(self):
        def row(t, done, th, p=0, f=0):
            return {"t": t, "done_total": done, "throttled": th, "pending": p, "inflight": f, "retrying": 0}

        rows = [row(0, 0, 0), row(1, 30, 10), row(2, 80, 40), row(3, 115, 60), row(4, 150, 20, f=5),
                row(5, 185, 0, f=3), row(6, 190, 0)]
        # from the first sample with >= 35 throttled (t=2) to the last with a backlog (t=5)
        self.assertEqual(replay.backlogged_pace(rows, 35), (2, 5, 35.0))
        self.assertEqual(replay.backlogged_pace(rows), (1, 5, 38.75))
        self.assertIsNone(replay.backlogged_pace(rows, 100))
        self.assertIsNone(replay.backlogged_pace([row(0, 0, 0)]))

    def test_step_above(self):
        s = setup()  # scale-up: max(+100 %, +4 pods)
        self.assertEqual([replay.step_above(s, n) for n in (1, 2, 4, 5, 12)], [5, 6, 8, 10, 20])
        s.behavior["up"].select = "Min"
        self.assertEqual(replay.step_above(s, 2), 4)
        s.behavior["up"].select = "Disabled"
        self.assertEqual(replay.step_above(s, 2), 2)
        self.assertEqual([replay.step_above(setup(behavior=False), n) for n in (1, 3, 15)], [4, 6, 20])

    def test_held_back(self):
        S = replay.Sync
        syncs = [
            S(1, 0, 0, 1, 1),  # nothing throttled yet
            S(2, 70, 8, 22, 5),  # onset: a backlog of admissible work in pending
            S(3, 144, 460, 36, 10),  # parking has begun but pending still holds a backlog
            S(4, 0, 500, 6, 10),  # the limiter holds it: from here on
            S(5, 2, 540, 2, 10),
            S(6, 9, 560, 3, 10),  # a promoted batch waits in pending: not counted
            S(7, 0, 0, 0, 10),  # backlog gone
            S(8, 0, 10, None, 0),  # no proposal (scaled to zero)
        ]
        self.assertEqual(replay.held_back(syncs, 4), (4, [6, 2]))
        self.assertEqual(replay.held_back(syncs[:3], 4), (None, []))
        # a fresh limiter parks its first second (seeded window): not yet a held-back backlog
        first_second = [S(0.7, 0, 3, 0, 1)] + syncs
        self.assertEqual(replay.held_back(first_second, 4, 35), (4, [6, 2]))
        self.assertEqual(replay.held_back(first_second, 4), (0.7, [0, 6, 2]))

    def test_scale_down_time(self):
        s = setup()  # window 300 s, 25 % per 60 s, sync 15 s
        # 10 -> 7 -> 5 -> 3 (int(10 * 0.75) = 7, int(7 * 0.75) = 5, int(5 * 0.75) = 3): 3 steps
        self.assertEqual(replay.scale_down_time(s, 10, 4), 300 + 15 + 3 * 75)
        self.assertEqual(replay.scale_down_time(s, 5, 4), 300 + 15 + 75)
        self.assertEqual(replay.scale_down_time(s, 4, 4), 0)
        self.assertEqual(replay.scale_down_time(s, 3, 0), 300 + 15 + 2 * 75)  # never below min 1
        self.assertEqual(replay.scale_down_time(setup(behavior=False), 10, 4), 300 + 15)
        s.behavior["down"].select = "Disabled"
        self.assertEqual(replay.scale_down_time(s, 10, 4), float("inf"))

    def test_task_waits_fifo(self):
        fifo = [(c * 100, 5000 + c * 100, 1) for c in range(30)]
        self.assertEqual(replay.task_waits(fifo)["overtaken"], 0)
        # the first task finishes last: every task created >= 1 s after it overtook it
        late = [(0, 9000, 3)] + fifo[10:]
        w = replay.task_waits(late)
        self.assertAlmostEqual(w["overtaken"], 1 / 21)
        self.assertEqual((w["wait_s"][100], w["parked"][100], w["tasks"]), (9.0, 3, 21))
        self.assertEqual(replay.task_waits([]), {})

    def test_percentile(self):
        self.assertEqual(replay.percentile([5, 1, 3, 2, 4], 50), 3)
        self.assertEqual(replay.percentile([5, 1, 3, 2, 4], 100), 5)
        self.assertEqual(replay.percentile(list(range(1, 101)), 95), 95)
        self.assertIsNone(replay.percentile([], 50))

    def test_values_fallback_renders_the_upstreams_file(self):
        from pathlib import Path
        import tempfile

        import yaml

        chart = Path(replay.__file__).resolve().parents[2] / "deploy/helm/agentq"
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            yaml.safe_dump({"llm": {"model": "m1"}, "upstreams": {"config": UPSTREAMS}}, fh)
            fh.flush()
            s = replay.setup_from_values(chart, [fh.name], ["worker.concurrency=4"])
        self.assertEqual(s.worker_env["AGENTQ_UPSTREAMS"], "/etc/agentq/upstreams/upstreams.yaml")
        self.assertEqual(s.upstreams, UPSTREAMS)
        self.assertIsNone(replay.setup_from_values(chart, [], []).upstreams)


if __name__ == "__main__":
    unittest.main()

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


if __name__ == "__main__":
    unittest.main()

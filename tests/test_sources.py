"""Sources: fresh, replay, offline, stale and the per-group mixer (no model needed)."""
from agro.rollouts import Group, collate
from agro.sources import (Mixer, OfflineSource, ReplaySource, StaleSource, build_mixer)


class FakeRollout:
    def __init__(self):
        self.calls = []
        self.count = 0

    def __call__(self, k, version):
        self.calls.append((k, version))
        out = []
        for _ in range(k):
            self.count += 1
            out.append(Group(prompt_id=f"p{self.count}", prompt_ids=[1, 2],
                             completion_ids=[[3], [4, 5]], rewards=[0.0, 1.0],
                             ref_logprobs=[[-1.0], [-1.0, -2.0]], policy_version=version))
        return out


def test_replay_prob_zero_and_one():
    ro = FakeRollout()
    src = ReplaySource(ro, capacity=4, replay_prob=0.0, seed=0)
    for v in range(3):
        gs = src.take(2, v)
        assert all(g.source == "fresh" for g in gs)
    assert len(src.buffer) == 4        # capacity respected, FIFO
    assert [g.prompt_id for g in src.buffer] == ["p3", "p4", "p5", "p6"]
    src.replay_prob = 1.0
    gs = src.take(3, 3)
    assert all(g.source == "replay" for g in gs) and ro.calls[-1] == (2, 2)
    assert all(g.policy_version < 3 for g in gs)   # provenance kept: old versions


def test_replay_state_roundtrip_is_exact():
    a = ReplaySource(FakeRollout(), capacity=8, replay_prob=0.5, seed=1)
    for v in range(4):
        a.take(4, v)
    st = a.state_dict()
    b = ReplaySource(FakeRollout(), capacity=8, replay_prob=0.5, seed=99)
    b.load_state_dict(st)
    b.rollout.count = a.rollout.count
    assert [g.prompt_id for g in a.take(4, 5)] == [g.prompt_id for g in b.take(4, 5)]


def test_stale_lag_versions():
    ro = FakeRollout()
    src = StaleSource(ro, lag=2)
    seen = [src.take(1, v)[0].policy_version for v in range(6)]
    assert seen == [0, 0, 0, 1, 2, 3]   # version v trains on data from max(0, v - 2)
    assert all(g.source == "stale" for g in src.take(1, 6))


def test_offline_epochs_without_replacement():
    groups = FakeRollout()(5, -1)
    src = OfflineSource(groups, seed=0)
    first = [g.prompt_id for g in src.take(5, 0)]
    assert sorted(first) == sorted(g.prompt_id for g in groups) and src.epoch == 1
    src.take(1, 0)
    assert src.epoch == 2
    assert all(g.source == "offline" for g in src.take(3, 0))


def test_mixer_per_group_and_on_policy_flags():
    ro = FakeRollout()
    off = FakeRollout()(6, -1)
    mixer = build_mixer({"fresh": 0.5, "offline": 0.5}, ro, offline_groups=off,
                        replay_capacity=4, replay_prob=0.5, stale_lag=1, seed=0)
    assert isinstance(mixer, Mixer)
    gs = mixer.take(40, 7)
    kinds = {g.source for g in gs}
    assert kinds == {"fresh", "offline"} and len(gs) == 40
    batch = collate(gs, pad_token_id=0, current_version=7)
    for g, b in zip(gs, range(0, batch.num_samples, 2)):
        assert bool(batch.on_policy[b]) == (g.source == "fresh")


def test_temperature_makes_fresh_groups_off_policy():
    g = FakeRollout()(1, 3)[0]
    assert g.is_on_policy(3)
    assert not g.is_on_policy(4)                  # stale version
    g.temperature = 0.7
    assert not g.is_on_policy(3)
    g.temperature, g.top_p = 1.0, 0.9
    assert not g.is_on_policy(3)


def test_collate_layout():
    g = Group(prompt_id="a", prompt_ids=[7, 8, 9], completion_ids=[[1], [2, 3]],
              rewards=[1.0, 0.0], ref_logprobs=[[-0.5], [-0.1, -0.2]])
    h = Group(prompt_id="b", prompt_ids=[5], completion_ids=[[4, 4], [6]],
              rewards=[0.0, 0.0], ref_logprobs=[[-1.0, -1.0], [-3.0]])
    b = collate([g, h], pad_token_id=0, current_version=-1)
    assert b.prompt_len == 3 and b.input_ids.shape == (4, 5)
    assert b.input_ids[2].tolist() == [0, 0, 5, 4, 4]
    assert b.attention_mask[2].tolist() == [0, 0, 1, 1, 1]
    assert b.completion_mask.tolist() == [[1, 0], [1, 1], [1, 1], [1, 0]]
    assert b.ref_logprobs[1].tolist() == [-0.10000000149011612, -0.20000000298023224]

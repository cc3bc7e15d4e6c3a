"""AMC's DDPG agent: its defaults, layer embedding, action wall, warm-up / noise schedule, replay and updates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.hpo.test_optimizer_suite import flops_space, roundtrip
from torchpocket.config import SECTIONS
from torchpocket.errors import UserError
from torchpocket.hpo import create_optimizer
from torchpocket.hpo.ddpg import DDPG, N_FEATURES, DDPGConfig


def make(space=None, *, total: int = 8, seed: int = 0, **cfg) -> DDPG:
    space = space if space is not None else flops_space()
    opt = create_optimizer("ddpg", space, seed=seed, total_trials=total, config=DDPGConfig(**cfg))
    assert isinstance(opt, DDPG)
    return opt


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_defaults_are_amcs_and_flags_are_prefixed() -> None:
    cfg = DDPGConfig()
    assert (cfg.hidden, cfg.lr_actor, cfg.lr_critic, cfg.tau, cfg.batch_size) == (300, 1e-4, 1e-3, 0.01, 64)
    assert (cfg.noise_init, cfg.discount, cfg.moving_alpha) == (0.5, 1.0, 0.5)
    assert cfg.memory_episodes == 100 and cfg.warmup == -1 and cfg.noise_decay == -1 and cfg.center == "uniform"
    assert make(total=400).noise_decay == 0.95  # AMC's protocol: AMC's decay
    assert SECTIONS["ddpg"] is DDPGConfig and DDPG.section == "ddpg" and DDPG.Config is DDPGConfig
    for f in dataclasses.fields(DDPGConfig):
        assert f.metadata["help"]
        assert f.metadata["flag"] == "--ddpg-" + f.name.replace("_", "-")
    opt = make()
    assert [m.out_features for m in opt.actor.modules() if isinstance(m, torch.nn.Linear)] == [300, 300, 1]
    assert opt.actor_optim.param_groups[0]["lr"] == 1e-4 and opt.critic_optim.param_groups[0]["lr"] == 1e-3
    assert opt.memory.capacity == 100 * len(opt.space)


@pytest.mark.parametrize(("total", "warmup", "expected"), [(400, -1, 100), (40, -1, 10), (2, -1, 1), (0, -1, 1),
                                                           (40, 3, 3), (40, 0, 0)])
def test_warmup_is_a_quarter_of_the_episodes_unless_given(total: int, warmup: int, expected: int) -> None:
    assert make(total=total, warmup=warmup, hidden=8).warmup == expected


def test_config_may_come_as_a_dict() -> None:
    opt = create_optimizer("ddpg", flops_space(), total_trials=8, config={"hidden": 16, "tau": 0.5})
    assert opt.config == DDPGConfig(hidden=16, tau=0.5)


@pytest.mark.parametrize("breakdown", [True, False])
def test_layer_embedding(breakdown: bool) -> None:
    space = flops_space(layer_costs=breakdown)
    opt = make(space, hidden=8)
    n, full = len(space), space.budget.full
    lows = space.lows
    states = [opt._state(t, lows.copy(), 0.5) for t in range(n)]  # layers before t at their lower bound
    assert all(s.shape == (N_FEATURES,) for s in states)
    static = np.stack(states)[:, :7]
    assert static.min() >= 0 and static.max() <= 1
    assert np.allclose(static[:, 0], np.linspace(0, 1, n))  # the index, min-max normalised
    reduced, rest = [s[7] for s in states], [s[8] for s in states]
    assert reduced[0] == 0 and all(b > a for a, b in zip(reduced, reduced[1:]))
    assert rest[-1] == 0 and all(b < a for a, b in zip(rest, rest[1:]))
    assert all(s[9] == 0.5 for s in states)  # the previous action, as given
    if breakdown:  # the later layers' resource, still at full size, as a fraction of the model's
        per_layer = np.asarray(space.budget.layer_costs(list(space.highs)))
        assert np.allclose(rest, [per_layer[t + 1:].sum() / full for t in range(n)])
    opt.ask()
    first = opt.pending[0]["states"][0]
    assert first[7] == 0 and first[9] == 1.0  # nothing reduced yet; AMC's a_{-1} = 1


def test_action_wall_keeps_greedy_actions_within_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    space = flops_space(fill=False)  # no projection upward: what comes out is the walled episode itself
    b = space.budget
    opt = make(space, hidden=8)
    opt.ask()  # the uniform episode
    monkeypatch.setattr(opt, "_act", lambda state, warm: 1.0)  # always ask for the whole layer
    p = opt.ask()
    assert p[0] == 1.0 and p[-1] == pytest.approx(0.2)
    assert b.limit * (1 - 1e-6) <= b.cost(p) <= b.limit * (1 + 1e-9)  # the wall lets it fill the budget exactly
    assert opt.pending[-1]["actions"] == [1.0] * len(space)  # the replay keeps the agent's own actions
    monkeypatch.setattr(opt, "_act", lambda state, warm: 0.0)
    assert opt.ask() == pytest.approx(list(space.lows))


def test_warmup_then_updates_and_noise_decay() -> None:
    opt = make(total=8, seed=1, noise_decay=0.95)  # warm-up: 2 episodes (the first is the uniform policy)
    n = len(opt.space)
    assert opt.warmup == 2
    actor0, critic0, target0 = params(opt.actor), params(opt.critic), params(opt.actor_target)
    for r in (0.1, 0.3):
        opt.tell(opt.ask(), r)
    assert same(params(opt.actor), actor0) and same(params(opt.critic), critic0)  # no learning in warm-up
    assert len(opt.memory) == 2 * n and opt.sigma == 0.5 and opt.moving_average is None
    assert torch.equal(opt.memory.rewards[:2 * n, 0], torch.tensor([0.1] * n + [0.3] * n))  # episode reward, all
    notdone = opt.memory.notdone[:2 * n, 0]
    assert notdone.sum() == 2 * (n - 1) and notdone[n - 1] == 0 and notdone[2 * n - 1] == 0
    assert torch.equal(opt.memory.next_states[0], opt.memory.states[1])

    p = opt.ask()  # the first episode of the agent: noise sigma 0.5, then x0.95 per episode
    assert opt.sigma == pytest.approx(0.5 * 0.95)
    opt.tell(p, 0.2)
    assert not same(params(opt.actor), actor0) and not same(params(opt.critic), critic0)
    target = params(opt.actor_target)
    assert not same(target, actor0) and not same(target, params(opt.actor))  # soft (tau) target updates
    assert not same(target, target0)
    steps = {int(s["step"]) for s in opt.actor_optim.state_dict()["state"].values()}
    assert steps == {n}  # one update per transition of the episode, as AMC
    assert opt.moving_average is not None and 0.1 <= opt.moving_average <= 0.3
    opt.ask()
    assert opt.sigma == pytest.approx(0.5 * 0.95**2)


def test_replay_memory_is_a_ring_of_episodes() -> None:
    opt = make(total=100, memory_episodes=2, hidden=8)
    n = len(opt.space)
    assert opt.memory.capacity == 2 * n
    for r in (1.0, 2.0, 3.0):
        opt.tell(opt.ask(), r)
    assert len(opt.memory) == 2 * n
    assert sorted(set(opt.memory.rewards[:, 0].tolist())) == [2.0, 3.0]


def test_out_of_order_tells_reach_the_right_episode() -> None:
    opt = make(total=100, hidden=8)
    a, b = opt.ask(), opt.ask()
    assert a != b
    states_b = torch.as_tensor(np.asarray(opt.pending[1]["states"]), dtype=torch.float32)
    opt.tell(b, 5.0)
    n = len(opt.space)
    assert torch.equal(opt.memory.states[:n], states_b) and torch.all(opt.memory.rewards[:n] == 5.0)
    opt.tell(a, -1.0)
    assert torch.all(opt.memory.rewards[n:2 * n] == -1.0) and not opt.pending
    opt.tell([0.5] * n, 0.0)  # a policy it never proposed: recorded, nothing to learn
    assert len(opt.memory) == 2 * n and len(opt.history) == 3


def test_uses_only_private_random_generators() -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    opt = make(total=4, hidden=16, batch_size=8)
    for r in range(4):
        opt.tell(opt.ask(), float(r))
    assert opt.actor_optim.state_dict()["state"]  # it did learn
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_truncated_normal_stays_in_the_unit_interval() -> None:
    opt = make(hidden=8)
    for mu, sigma in ((0.0, 0.5), (1.0, 0.5), (0.5, 5.0), (0.7, 1e-4), (1.0, 1e-6)):
        xs = np.array([opt._truncated_normal(mu, sigma) for _ in range(200)])
        assert xs.min() >= 0 and xs.max() <= 1
        if sigma < 1e-3:
            assert np.allclose(xs, mu, atol=1e-2)
    assert 0.1 < np.mean([opt._truncated_normal(0.0, 0.5) for _ in range(500)]) < 0.6


def test_state_dict_holds_everything() -> None:
    opt = make(total=4, hidden=16)
    for r in range(3):
        opt.tell(opt.ask(), float(r))
    opt.ask()
    state = roundtrip(opt.state_dict())  # tensors and plain Python: loads with weights_only=True
    for key in ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim", "memory",
                "sigma", "episode", "moving_average", "np_rng", "torch_rng", "pending", "history", "warmup"):
        assert key in state
    assert state["episode"] == 4 and len(state["pending"]) == 1 and state["memory"]["size"] == 3 * len(opt.space)
    with pytest.raises(UserError, match="layers"):
        make(flops_space(6), hidden=16).load_state_dict(state)


def test_noise_decays_to_the_end_of_a_short_search() -> None:
    from torchpocket.hpo.ddpg import noise_decay

    assert noise_decay(0.5, 300) == 0.95 and noise_decay(0.5, 0) == 0.95
    d = noise_decay(0.5, 22)
    assert d < 0.95 and 0.5 * d**22 == pytest.approx(0.02)
    opt = make(total=30, hidden=8)
    assert opt.noise_decay == pytest.approx(noise_decay(0.5, 30 - opt.warmup))


def test_first_episode_is_the_uniform_policy_and_enters_the_replay() -> None:
    space = flops_space(target=0.3)
    opt = make(space, total=40, hidden=8)
    p = opt.ask()
    assert opt.last_kind == "uniform" and p == space.budget.uniform()
    rec = opt.pending[0]
    assert [opt.to_value(t, u) for t, u in enumerate(rec["actions"])] == pytest.approx(p)
    opt.tell(p, 0.7)
    n = len(space)
    assert len(opt.memory) == n and torch.all(opt.memory.rewards[:n] == 0.7)
    opt.ask()
    assert opt.last_kind == "search"


@pytest.mark.parametrize("center", ["uniform", "linear"])
def test_the_neutral_action_lands_on_the_center(center: str) -> None:
    space = flops_space(target=0.3)
    opt = make(space, hidden=8, center=center)
    uniform = space.budget.uniform()
    for t in range(len(space)):
        mid = uniform[t] if center == "uniform" else 0.5 * (space.lows[t] + space.highs[t])
        assert opt.to_value(t, 0.5) == pytest.approx(mid)
        assert opt.to_value(t, 0.0) == pytest.approx(space.lows[t]) and opt.to_value(t, 1.0) == pytest.approx(1.0)
        for v in (space.lows[t], 0.25, mid, 0.9):
            assert opt.to_value(t, opt.to_action(t, v)) == pytest.approx(v)


def test_a_projected_episode_is_stored_as_the_policy_that_is_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    space = flops_space(target=0.5)  # fill: a walk that stops short of the target is raised to it
    opt = make(space, hidden=8)
    opt.ask()
    monkeypatch.setattr(opt, "_act", lambda state, warm: 0.0)  # every layer at its lower bound
    p = opt.ask()
    assert space.budget.fraction(p) > 0.49
    rec = opt.pending[-1]
    assert [opt.to_value(t, u) for t, u in enumerate(rec["actions"])] == pytest.approx(p)


def test_trial_info_reports_the_episode_noise_and_critic_loss() -> None:
    opt = make(total=6, hidden=8, warmup=2)
    infos = []
    for r in (0.1, 0.2, 0.3, 0.4):
        opt.tell(opt.ask(), r)
        infos.append(opt.trial_info()["ddpg"])
    assert [i["episode"] for i in infos] == [0, 1, 2, 3]
    assert [i["warmup"] for i in infos] == [True, True, False, False]
    assert infos[0]["critic_loss"] is None and infos[2]["critic_loss"] > 0
    assert len(infos[3]["actions"]) == len(opt.space) and all(0 <= u <= 1 for u in infos[3]["actions"])
    opt.tell([0.5] * len(opt.space), 0.0)  # not its episode: nothing stale is reported
    assert opt.trial_info() == {}

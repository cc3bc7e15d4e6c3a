"""``ddpg``: AMC's agent (He et al., ECCV 2018) — DDPG walking the layers one action at a time.

One :meth:`DDPG.ask` is one AMC episode: for layer ``t`` the agent sees the
10-feature layer embedding (index, type, in/out channels, stride, kernel,
params — min-max normalised over the layers — then the resource reduced by
the layers before, the resource of the layers after, and the previous action),
picks an action in ``[0, 1]`` (the actor's sigmoid plus truncated-normal
exploration noise; uniform random during warm-up) that maps onto the layer's
``[low, high]``, and the *action wall* lowers it so that the remaining layers at
their lower bounds can still meet the target. The finished policy is projected
by the budget like every other optimizer's; when that moves it, the episode
stored in the replay memory is the projected policy's (its states and actions).

:meth:`DDPG.tell` gives the episode's reward to every transition of that
episode, stores them in the replay memory and, after warm-up, does one
actor-critic update per transition; each update subtracts a moving average of
the batch rewards (AMC's baseline). Plain torch, private random generators, and
a :meth:`DDPG.state_dict` that holds everything needed to resume bit for bit.

Where torchpocket departs from AMC (mit-han-lab/amc), and why:

- **The first episode is the uniform policy** (its actions enter the replay
  memory like any other), so the search never returns less than uniform.
- **Action 0.5 maps to the layer's uniform value** (``--ddpg-center uniform``;
  0 and 1 stay the layer's bounds). In AMC the action is the preserve ratio
  itself, so the untrained actor's 0.5 and the middle of the warm-up spend a
  tight budget (0.3 of the FLOPs) on the first layers and the action wall pins
  the rest at the lower bound; centred, the agent starts from the uniform
  policy and explores around it. ``--ddpg-center linear`` restores AMC's map.
- **Noise decay** is AMC's 0.95 per learning episode, or faster in a search too
  short for it to end near zero (sigma 0.02 by the last episode).
- **Under ``--pareto LO:HI``** (an extension of AMC, not in the paper): each
  episode draws its own target in ``[LO, HI]`` (the uniform seeds: the points of
  the uniform curve) and the agent sees it as an 11th state feature (the target's
  place in the window, 0 to 1); the action wall, the centre of the actions (the
  uniform policy at that target) and the final projection use that target, so one
  agent learns the whole front.
- Remaining differences (kept): ``log1p`` of the parameter count and constant
  features at 0 in the embedding; *reduced* counts the undecided layers at full
  size (AMC: at their lower bound); the previous action is scaled to the
  layer's bounds; every proposal is projected onto the Budget (AMC evaluates the
  walked policy, which may fall short of the target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.errors import UserError
from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import Optimizer
from torchpocket.options import opt
from torchpocket.space import Budget, Policy, SearchSpace

N_FEATURES = 10  # AMC's layer embedding: 7 static features + reduced, rest, previous action


@dataclass
class DDPGConfig:
    """AMC's DDPG agent (section ``ddpg``); defaults are those of the AMC paper and code."""

    warmup: int = opt(-1, "episodes of uniform random actions before the agent learns "
                          "(-1 = 25% of the search's episodes, at least 1: AMC's 100 of 400)", flag="--ddpg-warmup")
    hidden: int = opt(300, "units in each of the two hidden layers of the actor and the critic", flag="--ddpg-hidden",
                      positive=True)
    lr_actor: float = opt(1e-4, "Adam learning rate of the actor", flag="--ddpg-lr-actor")
    lr_critic: float = opt(1e-3, "Adam learning rate of the critic", flag="--ddpg-lr-critic")
    tau: float = opt(0.01, "soft-update rate of the target networks", flag="--ddpg-tau")
    batch_size: int = opt(64, "transitions per actor-critic update", flag="--ddpg-batch-size", positive=True)
    memory_episodes: int = opt(100, "replay memory size, in episodes (AMC: 100 transitions per layer)",
                               flag="--ddpg-memory-episodes", positive=True)
    noise_init: float = opt(0.5, "initial sigma of the truncated-normal exploration noise", flag="--ddpg-noise-init")
    noise_decay: float = opt(-1.0, "factor applied to the noise sigma after every episode past warm-up (-1 = "
                                   "AMC's 0.95, or faster when fewer learning episodes remain, so that sigma ends "
                                   "at 0.02 by the last episode)", flag="--ddpg-noise-decay")
    discount: float = opt(1.0, "discount factor of the critic's target", flag="--ddpg-discount")
    moving_alpha: float = opt(0.5, "rate of the moving-average reward baseline", flag="--ddpg-moving-alpha")
    center: str = opt("uniform", "where the action 0.5 (the untrained actor's output, the middle of the warm-up "
                                 "and of the noise) lands: uniform = the layer's value in the uniform policy, "
                                 "0 and 1 still the layer's bounds (torchpocket); linear = the middle of "
                                 "[low, high] (AMC)", flag="--ddpg-center", choices=("uniform", "linear"))




def _init_linear(module: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default Linear init (uniform +-1/sqrt(fan_in)), drawn from a private generator."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)


AMC_NOISE_DECAY = 0.95
NOISE_END = 0.02


def noise_decay(sigma0: float, learning_episodes: int) -> float:
    """AMC's 0.95 per episode, or faster so that sigma is down to 0.02 by the last of a short search."""
    if learning_episodes <= 0 or sigma0 <= NOISE_END:
        return AMC_NOISE_DECAY
    return min(AMC_NOISE_DECAY, (NOISE_END / sigma0) ** (1.0 / learning_episodes))


class Actor(nn.Module):
    """State -> action in [0, 1]: two hidden ReLU layers and a sigmoid output."""

    def __init__(self, n_states: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_states, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state)


class Critic(nn.Module):
    """(state, action) -> Q: state and action enter the first hidden layer through separate weights."""

    def __init__(self, n_states: int, hidden: int) -> None:
        super().__init__()
        self.state_in = nn.Linear(n_states, hidden)
        self.action_in = nn.Linear(1, hidden)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        return self.body(self.state_in(state) + self.action_in(action))


class ReplayMemory:
    """A ring buffer of (state, action, reward, next state, not-done) transitions, kept as tensors."""

    def __init__(self, capacity: int, n_states: int) -> None:
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.states = torch.zeros(capacity, n_states)
        self.next_states = torch.zeros(capacity, n_states)
        self.actions = torch.zeros(capacity, 1)
        self.rewards = torch.zeros(capacity, 1)
        self.notdone = torch.zeros(capacity, 1)

    def __len__(self) -> int:
        return self.size

    def append(self, state: np.ndarray, action: float, reward: float, next_state: np.ndarray, done: bool) -> None:
        i = self.pos
        self.states[i] = torch.as_tensor(state, dtype=torch.float32)
        self.next_states[i] = torch.as_tensor(next_state, dtype=torch.float32)
        self.actions[i, 0], self.rewards[i, 0], self.notdone[i, 0] = action, reward, 0.0 if done else 1.0
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[Tensor, ...]:
        # without replacement when there is enough data (AMC / keras-rl); with replacement early on
        idx = torch.as_tensor(rng.choice(self.size, size=batch_size, replace=self.size < batch_size))
        return self.states[idx], self.actions[idx], self.rewards[idx].clone(), self.next_states[idx], self.notdone[idx]

    _FIELDS = ("states", "next_states", "actions", "rewards", "notdone")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"capacity": self.capacity, "size": self.size, "pos": self.pos}
        out.update({k: getattr(self, k)[: self.size].clone() for k in self._FIELDS})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise UserError(f"DDPG replay memory holds {self.capacity} transitions, the saved one "
                            f"{int(state['capacity'])}: resume with the same --ddpg-memory-episodes and model")
        self.size, self.pos = int(state["size"]), int(state["pos"])
        for k in self._FIELDS:
            getattr(self, k)[: self.size] = state[k]


@register_hpo("ddpg")
class DDPG(Optimizer):
    """AMC's DDPG agent: walks the layers one action at a time, with the action wall and truncated-normal noise"""

    parallel: ClassVar[bool] = False
    seeds_uniform: ClassVar[bool] = True
    pareto: ClassVar[bool] = True  # each episode's target drawn in the window, and given to the agent
    Config: ClassVar[type] = DDPGConfig  # its config section, for the pipeline
    section: ClassVar[str] = "ddpg"

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        cfg = self.config
        n = len(space)
        if n == 0:
            raise UserError("--hpo ddpg needs at least one compressible layer")
        self.warmup = cfg.warmup if cfg.warmup >= 0 else max(1, round(0.25 * self.total_trials))
        self.noise_decay = cfg.noise_decay if cfg.noise_decay > 0 else noise_decay(
            cfg.noise_init, self.total_trials - self.warmup)
        self.np_rng = np.random.default_rng(self.seed)
        self.torch_rng = torch.Generator().manual_seed(self.seed)
        self.window = None if space.budget.floor is None else (float(space.budget.floor), space.budget.target)
        nf = self.n_states = N_FEATURES + (self.window is not None)  # + the episode's target under --pareto

        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global generator
            self.actor, self.critic = Actor(nf, cfg.hidden), Critic(nf, cfg.hidden)
            self.actor_target, self.critic_target = Actor(nf, cfg.hidden), Critic(nf, cfg.hidden)
        _init_linear(self.actor, self.torch_rng)
        _init_linear(self.critic, self.torch_rng)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        self.memory = ReplayMemory(cfg.memory_episodes * n, nf)

        self.episode = 0  # episodes started by ask()
        self.sigma = cfg.noise_init
        self.moving_average: float | None = None
        self.pending: list[dict[str, Any]] = []  # asked, not yet told: policy, episode, states, actions
        self._info: dict[str, Any] = {}  # the latest told episode, for trials.jsonl

        self.static = self._static_embedding()
        self.lows, self.highs = space.lows, space.highs
        self.span = self.highs - self.lows
        self._full_cost = self._total(list(self.highs))
        self.budget: Budget = space.budget
        self._set_goal(space.budget.target)

    def _set_goal(self, goal: float) -> None:
        """The episode's target ``goal``: the Budget it walks under (the search's own one, or a copy at that point
        of the Pareto window) and its action centre (the uniform policy there, or the middle of each range)."""
        self.goal = float(goal)
        self.budget = self.space.budget if self.window is None else self.space.budget.retarget(self.goal)
        self.center = (np.asarray(self.budget.uniform(), float) if self.config.center == "uniform"
                       else self.lows + 0.5 * self.span)

    # -- actions: [0, 1] -> the layer's [low, high], 0.5 -> its center -------------------------------
    def to_value(self, t: int, u: float) -> float:
        lo, c, hi = float(self.lows[t]), float(self.center[t]), float(self.highs[t])
        return lo + 2 * u * (c - lo) if u <= 0.5 else c + (2 * u - 1) * (hi - c)

    def to_action(self, t: int, value: float) -> float:
        lo, c, hi = float(self.lows[t]), float(self.center[t]), float(self.highs[t])
        if value <= c:
            return 0.5 * (value - lo) / (c - lo) if c > lo else 0.5
        return 0.5 + 0.5 * (value - c) / (hi - c) if hi > c else 0.5

    # -- the environment side: AMC's layer embedding ---------------------------------------------
    def _static_embedding(self) -> np.ndarray:
        f = self.space.static_features()
        lo, hi = f.min(axis=0), f.max(axis=0)
        rng = np.where(hi > lo, hi - lo, 1.0)
        return np.where(hi > lo, (f - lo) / rng, 0.0)  # a feature equal across layers carries nothing

    def _total(self, policy: list[float]) -> float:
        b = self.space.budget
        return float(sum(b.layer_costs(policy))) if b.layer_cost_fn is not None else b.cost(policy)

    def _state(self, t: int, policy: np.ndarray, prev: float) -> np.ndarray:
        """Embedding of layer ``t``, with ``policy[:t]`` decided and the later layers still at full size."""
        b, full = self.space.budget, self.space.budget.full
        current = [float(v) for v in policy[:t]] + [float(v) for v in self.highs[t:]]
        reduced = (self._full_cost - self._total(current)) / full
        if b.layer_cost_fn is not None:
            rest = float(sum(b.layer_costs(current)[t + 1:])) / full
        else:  # what the later layers could still give up
            rest = (b.cost(current) - b.cost(current[: t + 1] + [float(v) for v in self.lows[t + 1:]])) / full
        extra = [] if self.window is None else [(self.goal - self.window[0]) / (self.window[1] - self.window[0])]
        return np.concatenate([self.static[t], [reduced, rest, prev], extra])

    # -- acting ------------------------------------------------------------------------------------
    def _truncated_normal(self, mu: float, sigma: float) -> float:
        for _ in range(1000):
            x = self.np_rng.normal(mu, sigma)
            if 0.0 <= x <= 1.0:
                return float(x)
        return float(np.clip(mu, 0.0, 1.0))

    def _act(self, state: np.ndarray, warm: bool) -> float:
        if warm:
            return float(self.np_rng.uniform(0.0, 1.0))
        with torch.no_grad():
            mu = float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])
        return float(np.clip(self._truncated_normal(mu, self.sigma), 0.0, 1.0))

    def ask(self) -> Policy:
        warm = self.episode < self.warmup
        seeding = self.seeding()
        if seeding:  # the uniform episode(s): the actions that give the uniform policy, stored like the agent's own
            k = self.n_seeded
            out = self.ask_uniform()
            if self.window is not None:  # the uniform seed's own point of the window
                points = self.space.budget.points()
                self._set_goal(points[min(k, len(points) - 1)])
            states, actions = self._walk(out)
        else:
            self.last_kind = "search"
            if self.window is not None:
                self._set_goal(float(self.np_rng.uniform(*self.window)))
            b = self.budget
            policy, states, actions = self._episode(warm)
            out = b.project(policy)
            if not np.allclose(out, policy, rtol=0, atol=1e-9):
                # the Budget moved the walked policy (filled it up to the target): store the actions and
                # states of the policy that is scored, so the critic learns the reward of what was done
                states, actions = self._walk(out)
        self.pending.append({"policy": list(out), "episode": self.episode, "states": states, "actions": actions,
                             "goal": self.goal})
        if not warm:
            self.sigma *= self.noise_decay
        self.episode += 1
        return out

    def _episode(self, warm: bool) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
        """One walk over the layers with the agent's (or warm-up) actions and the action wall."""
        b, n = self.budget, len(self.space)
        policy = self.highs.copy()
        states, actions = [], []
        prev = 1.0
        for t in range(n):
            s = self._state(t, policy, prev)
            u = self._act(s, warm)
            a = min(self.to_value(t, u), b.max_action(list(policy[:t]), t))  # the action wall
            trial = policy.copy()
            trial[t] = a
            policy[t] = b.clip(trial)[t]  # the layer's granularity (e.g. whole bits)
            prev = self._prev(t, policy[t])
            states.append(s)
            actions.append(u)
        return policy, states, actions

    def _walk(self, target: Policy) -> tuple[list[np.ndarray], list[float]]:
        """The states and actions of an episode that ends in ``target``."""
        policy = self.highs.copy()
        states, actions = [], []
        prev = 1.0
        for t in range(len(self.space)):
            states.append(self._state(t, policy, prev))
            actions.append(self.to_action(t, float(target[t])))
            policy[t] = float(target[t])
            prev = self._prev(t, policy[t])
        return states, actions

    def _prev(self, t: int, value: float) -> float:
        return float((value - self.lows[t]) / self.span[t]) if self.span[t] > 0 else 1.0

    # -- learning ----------------------------------------------------------------------------------
    def _take_pending(self, policy: Policy) -> dict[str, Any] | None:
        key = [float(v) for v in policy]
        for i, rec in enumerate(self.pending):
            if rec["policy"] == key:
                return self.pending.pop(i)
        return self.pending.pop(0) if self.pending else None

    def tell(self, policy: Policy, reward: float) -> None:
        super().tell(policy, reward)
        self._info = {}
        rec = self._take_pending(policy)
        if rec is None or not math.isfinite(reward):
            return  # not an episode of ours, or a failed candidate: nothing the critic could fit
        states, actions = rec["states"], rec["actions"]
        learn = rec["episode"] >= self.warmup
        losses = []
        for t, (s, u) in enumerate(zip(states, actions)):
            done = t == len(states) - 1
            self.memory.append(s, u, float(reward), s if done else states[t + 1], done)
            if learn:
                losses.append(self._update())
        self._info = {"episode": rec["episode"], "warmup": not learn, "sigma": self.sigma,
                      **({"target": rec["goal"]} if self.window is not None else {}),
                      "actions": [round(float(u), 6) for u in actions],
                      "critic_loss": sum(losses) / len(losses) if losses else None}

    def trial_info(self) -> dict[str, Any]:
        """The agent's side of the latest told episode: its actions in [0, 1], the noise, the critic's loss."""
        return {"ddpg": dict(self._info)} if self._info else {}

    def _update(self) -> float:
        cfg = self.config
        s, a, r, s2, notdone = self.memory.sample(cfg.batch_size, self.np_rng)
        mean = float(r.mean())
        if self.moving_average is None:
            self.moving_average = mean
        else:
            self.moving_average += cfg.moving_alpha * (mean - self.moving_average)
        r -= self.moving_average
        with torch.no_grad():
            target_q = r + cfg.discount * notdone * self.critic_target(s2, self.actor_target(s2))
        critic_loss = nn.functional.mse_loss(self.critic(s, a), target_q)
        loss_value = float(critic_loss.detach())
        self.critic_optim.zero_grad()
        critic_loss.backward()
        self.critic_optim.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_optim.zero_grad()
        actor_loss.backward()
        self.actor_optim.step()
        with torch.no_grad():
            for tgt, src in ((self.actor_target, self.actor), (self.critic_target, self.critic)):
                for pt, p in zip(tgt.parameters(), src.parameters()):
                    pt.mul_(1.0 - cfg.tau).add_(p, alpha=cfg.tau)
        return loss_value

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [[list(p), r] for p, r in self.history],
            "n_layers": len(self.space),
            "warmup": self.warmup,
            "episode": self.episode,
            "seeded": self.seeded,
            "sigma": self.sigma,
            "moving_average": self.moving_average,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optim": self.actor_optim.state_dict(),
            "critic_optim": self.critic_optim.state_dict(),
            "memory": self.memory.state_dict(),
            "pending": [{"policy": list(rec["policy"]), "episode": rec["episode"],
                         "states": torch.as_tensor(np.asarray(rec["states"]), dtype=torch.float64),
                         "actions": list(rec["actions"]), "goal": rec["goal"]} for rec in self.pending],
            "n_seeded": self.n_seeded, "goal": self.goal, "n_states": self.n_states,
            "np_rng": self.np_rng.bit_generator.state,
            "torch_rng": self.torch_rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n_layers"]) != len(self.space):
            raise UserError(f"the DDPG state is for {int(state['n_layers'])} layers, this model has "
                            f"{len(self.space)}: resume with the same model and learner")
        self.history = [(list(p), float(r)) for p, r in state["history"]]
        self.warmup, self.episode = int(state["warmup"]), int(state["episode"])
        self.seeded = bool(state.get("seeded", self.episode > 0))
        if int(state.get("n_states", N_FEATURES)) != self.n_states:
            raise UserError("the DDPG state is from a search with a different --pareto setting: resume it with the "
                            "same --pareto (or none)")
        self.n_seeded = int(state.get("n_seeded", int(self.seeded)))
        self._set_goal(float(state.get("goal", self.space.budget.target)))
        self.sigma = float(state["sigma"])
        self.moving_average = None if state["moving_average"] is None else float(state["moving_average"])
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim"):
            getattr(self, name).load_state_dict(state[name])
        self.memory.load_state_dict(state["memory"])
        self.pending = [{"policy": list(rec["policy"]), "episode": int(rec["episode"]),
                         "states": list(rec["states"].numpy()), "actions": [float(u) for u in rec["actions"]],
                         "goal": float(rec.get("goal", self.space.budget.target))} for rec in state["pending"]]
        self.np_rng.bit_generator.state = state["np_rng"]
        self.torch_rng.set_state(state["torch_rng"])

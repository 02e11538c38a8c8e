"""Flower adapter: run a gradax ``FederatedAlgorithm`` across machines.

The same one-client update (``alg.client_update``) runs inside a Flower
``ClientApp`` and the same server update (``alg.server_update``, i.e. the
aggregator plus the server optax step) runs inside a Flower message-API
``Strategy`` driven by a ``ServerApp``. Given the same participation masks,
local work and round keys, a deployment computes what the in-process
simulation (``core.run_rounds``) computes.

Requires the optional extra ``gradax[flower]`` (``flwr>=1.42``); ``flwr`` is
imported only when an app is built. Client identity: each SuperNode is one
client, whose id is its ``--node-config partition-id=<n>``. The server learns
the mapping with one ``query`` message per node before round 1 (enable
SuperNode authentication in production so that ids are stable; FedAU's
weights are per client).

A Flower App needs a ``pyproject.toml`` with ``[tool.flwr.app.components]``
pointing at a module that does, e.g.::

    from gradax.federated import flower
    server_app = flower.server_app(flower.demo_experiment)
    client_app = flower.client_app(flower.demo_experiment)

``app_pyproject()`` writes such a file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradax.federated.core import ClientData, FederatedAlgorithm, run_rounds


class FlowerExperiment(NamedTuple):
  """Everything both sides must agree on (built from the run config).

  Attributes:
    algorithm: the ``FederatedAlgorithm`` (with client/server updates).
    init_params: initial global model (pytree).
    data: ``ClientData`` of all clients; a node reads only its own row.
    participation: ``[T, N]`` bool.
    work: ``[T, N]`` int32 local work.
    round_keys: ``[T]`` PRNG keys; client n uses ``fold_in(key_t, n)``.
  """
  algorithm: FederatedAlgorithm
  init_params: Any
  data: ClientData
  participation: np.ndarray
  work: np.ndarray
  round_keys: Any


def simulate(exp: FlowerExperiment):
  """The in-process reference: all rounds in one jitted ``lax.scan``."""
  alg = exp.algorithm
  state = alg.init(exp.init_params)
  run = jax.jit(lambda s, p, k, w: run_rounds(alg, s, exp.data, p, k, w))
  state, diag = run(state, jnp.asarray(exp.participation), exp.round_keys,
                    jnp.asarray(exp.work))
  return state, diag


def _participation_from_string(spec: str, n: int, t: int) -> np.ndarray:
  rows = [r.strip() for r in spec.split(",") if r.strip()]
  if len(rows) != n or any(len(r) != t or set(r) - {"0", "1"} for r in rows):
    raise ValueError(
        f"participation {spec!r} must be {n} comma-separated strings of {t} "
        "'0'/'1' characters (one per client, one character per round).")
  return np.array([[c == "1" for c in r] for r in rows]).T


def demo_experiment(run_config: dict) -> FlowerExperiment:
  """FedAU on FedProx synthetic(1,1) with a softmax-regression model.

  Run-config keys (all optional): ``num-clients`` (2), ``num-rounds`` (3),
  ``seed`` (0), ``local-steps`` (5), ``lr`` (0.05), ``cutoff`` (100000),
  ``participation`` ("" = Bernoulli with p_n evenly spaced in [0.3, 0.9];
  or per-client 0/1 strings such as "011,110").
  """
  from gradax.federated import data as fdata
  from gradax.federated import models, participation as fpart
  from gradax.federated.core import LocalConfig
  from gradax.federated.fedau import fedau
  import optax

  n = int(run_config.get("num-clients", 2))
  t = int(run_config.get("num-rounds", 3))
  seed = int(run_config.get("seed", 0))
  steps = int(run_config.get("local-steps", 5))
  split = fdata.synthetic(1.0, 1.0, num_users=n, seed=seed)
  model = models.softmax_regression(60, 10)
  alg = fedau(models.masked_xent(model),
              optax.sgd(float(run_config.get("lr", 0.05))),
              LocalConfig(10, "steps", steps), n,
              cutoff=int(run_config.get("cutoff", 100000)))
  spec = str(run_config.get("participation", ""))
  if spec:
    part = _participation_from_string(spec, n, t)
  else:
    part = fpart.Bernoulli(np.linspace(0.3, 0.9, n)).sample(t, seed)
  work = np.full((t, n), steps, np.int32)
  keys = jax.random.split(jax.random.key(seed), t)
  return FlowerExperiment(alg, model.init(jax.random.key(seed)), split.train,
                          part, work, keys)


def _to_arrays(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _from_arrays(template, arrays):
  treedef = jax.tree.structure(template)
  return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays])


def client_app(make_experiment: Callable[[dict], FlowerExperiment]):
  """Builds a Flower ``ClientApp`` running ``alg.client_update``.

  The node's client id is ``context.node_config["partition-id"]``.
  """
  from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, \
      RecordDict
  from flwr.clientapp import ClientApp

  app = ClientApp()
  cache: dict = {}

  def setup(context):
    key = tuple(sorted(context.run_config.items()))
    if cache.get("key") != key:
      exp = make_experiment(dict(context.run_config))
      alg = exp.algorithm
      cache.update(key=key, exp=exp, update=jax.jit(alg.client_update))
    return cache["exp"], cache["update"]

  @app.query()
  def query(msg: Message, context) -> Message:
    cid = int(context.node_config["partition-id"])
    return Message(RecordDict({"info": ConfigRecord({"client-id": cid})}),
                   reply_to=msg)

  @app.train()
  def train(msg: Message, context) -> Message:
    exp, update = setup(context)
    cid = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    t = int(cfg["round-index"])
    params = _from_arrays(exp.init_params,
                          msg.content["arrays"].to_numpy_ndarrays())
    state = exp.algorithm.init(params)
    ex = jax.tree.map(lambda a: a[cid], exp.data.examples)
    n_k = exp.data.num_examples[cid]
    key = jax.random.fold_in(exp.round_keys[t], cid)
    delta, n_k = update(state, ex, n_k, jnp.int32(int(cfg["work"])), key,
                        cid)
    content = RecordDict({
        "arrays": ArrayRecord(_to_arrays(delta)),
        "metrics": MetricRecord({"num-examples": int(n_k), "client-id": cid}),
    })
    return Message(content, reply_to=msg)

  return app


def make_strategy(exp: FlowerExperiment, node_of_client: dict[int, int]):
  """A ``flwr.serverapp.strategy.Strategy`` running ``alg.server_update``."""
  from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, \
      RecordDict
  from flwr.serverapp.strategy import Strategy

  alg = exp.algorithm
  n = exp.participation.shape[1]
  server_update = jax.jit(alg.server_update)

  class GradaxStrategy(Strategy):
    """Message-API strategy holding the full gradax ``ServerState``."""


    def __init__(self):
      self.state = alg.init(exp.init_params)
      self.history: list[dict] = []

    def configure_train(self, server_round, arrays, config, grid):
      t = server_round - 1
      msgs = []
      for cid in np.flatnonzero(exp.participation[t]):
        cfg = ConfigRecord({"round-index": t, "work": int(exp.work[t, cid])})
        content = RecordDict({
            "arrays": ArrayRecord(_to_arrays(self.state.params)),
            "config": cfg})
        msgs.append(Message(content, dst_node_id=node_of_client[int(cid)],
                            message_type="train"))
      return msgs

    def aggregate_train(self, server_round, replies):
      deltas, n_ex = {}, {}
      for r in replies:
        if r.has_error():
          raise RuntimeError(f"a client failed in round {server_round}: "
                             f"{r.error}")
        m = r.content["metrics"]
        cid = int(m["client-id"])
        n_ex[cid] = int(m["num-examples"])
        deltas[cid] = r.content["arrays"].to_numpy_ndarrays()
      part = np.zeros(n, bool)
      for cid, k in n_ex.items():
        part[cid] = k > 0      # a client with no examples is skipped
      ids = np.flatnonzero(part)
      slots = np.zeros(n, np.int32)
      slots[:len(ids)] = ids
      valid = np.arange(n) < len(ids)
      template = _to_arrays(self.state.params)
      stacked = []
      for li, leaf in enumerate(template):
        buf = np.zeros((n,) + leaf.shape, leaf.dtype)
        for s, cid in enumerate(ids):
          buf[s] = deltas[int(cid)][li]
        stacked.append(buf)
      stacked = _from_arrays(self.state.params, stacked)
      n_slots = np.array([n_ex.get(int(c), 0) if v else 0
                          for c, v in zip(slots, valid)], np.int32)
      self.state = server_update(self.state, stacked, jnp.asarray(slots),
                                 jnp.asarray(valid), jnp.asarray(n_slots),
                                 jnp.asarray(part))
      self.history.append({"round": server_round,
                           "participants": ids.tolist()})
      return ArrayRecord(_to_arrays(self.state.params)), MetricRecord(
          {"num-participants": int(len(ids))})

    def configure_evaluate(self, server_round, arrays, config, grid):
      return []

    def aggregate_evaluate(self, server_round, replies):
      return None

    def summary(self):
      pass

  return GradaxStrategy()


def _wait_for_nodes(grid, n: int, timeout: float) -> list[int]:
  deadline = time.monotonic() + timeout
  while True:
    ids = list(grid.get_node_ids())
    if len(ids) >= n:
      return ids
    if time.monotonic() > deadline:
      raise TimeoutError(f"only {len(ids)} of {n} SuperNodes connected "
                         f"within {timeout:.0f} s.")
    time.sleep(0.5)


def server_app(make_experiment: Callable[[dict], FlowerExperiment]):
  """Builds a Flower ``ServerApp`` that runs all rounds of the experiment.

  It waits for N SuperNodes, asks each for its client id, runs
  ``GradaxStrategy`` for T rounds, and, if the run config has
  ``output-path``, saves the final parameters (``params_<i>`` in leaf order)
  and, for FedAU, the interval statistics to that ``.npz`` file.
  """
  from flwr.app import ArrayRecord, Message, RecordDict
  from flwr.serverapp import ServerApp

  app = ServerApp()

  @app.main()
  def main(grid, context) -> None:
    cfg = dict(context.run_config)
    exp = make_experiment(cfg)
    t, n = exp.participation.shape
    node_ids = _wait_for_nodes(grid, n, float(cfg.get("node-timeout", 600)))
    queries = [Message(RecordDict(), dst_node_id=nid, message_type="query")
               for nid in node_ids]
    node_of_client = {}
    for r in grid.send_and_receive(
        queries, timeout=float(cfg.get("node-timeout", 600))):
      cid = int(r.content["info"]["client-id"])
      node_of_client[cid] = r.metadata.src_node_id
    missing = sorted(set(range(n)) - set(node_of_client))
    if missing:
      raise RuntimeError(f"no SuperNode reported client ids {missing}.")
    strategy = make_strategy(exp, node_of_client)
    strategy.start(grid, ArrayRecord(_to_arrays(exp.init_params)),
                   num_rounds=t, timeout=float(cfg.get("round-timeout", 300)))
    out = cfg.get("output-path")
    if out:
      st = strategy.state
      arrays = {f"params_{i}": a for i, a in enumerate(_to_arrays(st.params))}
      for name in ("since", "interval_sum", "interval_count"):
        if hasattr(st.agg_state, name):
          arrays[name] = np.asarray(getattr(st.agg_state, name))
      np.savez(out, **arrays)

  return app


def app_pyproject(module: str, name: str = "gradax-flower-app",
                  run_config: dict | None = None) -> str:
  """Text of a Flower App ``pyproject.toml`` whose components live in
  ``module`` (as ``server_app`` and ``client_app``)."""
  lines = [
      "[build-system]", 'requires = ["hatchling"]',
      'build-backend = "hatchling.build"', "", "[project]",
      f'name = "{name}"', 'version = "1.0.0"',
      'description = "gradax federated algorithm deployed with Flower"',
      'license = "Apache-2.0"', 'dependencies = ["flwr>=1.42"]', "",
      "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
      "[tool.flwr.app]", 'publisher = "gradax"', "",
      "[tool.flwr.app.components]", f'serverapp = "{module}:server_app"',
      f'clientapp = "{module}:client_app"', "", "[tool.flwr.app.config]"]
  for k, v in (run_config or {}).items():
    if isinstance(v, str):
      lines.append(f'{k} = "{v}"')
    elif isinstance(v, bool):
      lines.append(f"{k} = {'true' if v else 'false'}")
    else:
      lines.append(f"{k} = {v}")
  return "\n".join(lines) + "\n"

"""Upload rules, their privacy claims, uniform random choices, download bytes,
weighted FedAvg and the library/run-layer boundary."""

import ast
import math
import os
import pathlib

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dssgd_jax import accounting
from dssgd_jax import algorithms
from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import rules
from dssgd_jax import selection
from dssgd_jax import server as server_lib
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

P_MIN = 1e-4  # chi-square tests: a correct sampler fails this 1 time in 10^4


# ----------------------------------------------------------------------------
# The privacy claim of a chain, against independent computations.


def _rdp_gaussian(z_effective, epochs, delta):
  """ε of E Gaussian releases with noise multiplier z, by dp_accounting."""
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(z_effective), int(epochs))
  return acc.get_epsilon(delta)


D, C_, E, DELTA = 1000, 100, 7, 1e-5
GAMMA, B, SIGMA, L2, EPS, TAU = 0.01, 0.5, 2.0, 0.3, 0.8, 0.001

CLAIMS = [
    # (name, rule, expected ε or None, a phrase of the reason)
    ("random+clip+laplace",
     rules.chain(rules.select_random(C_), rules.clip(GAMMA), rules.laplace(B)),
     E * 2 * GAMMA * C_ / B, None),
    ("largest+clip+laplace",
     rules.chain(rules.select_largest(C_), rules.clip(GAMMA),
                 rules.laplace(B)), None, "select_largest(100) chooses"),
    ("threshold(all)+l2+gaussian: never a claim",
     rules.chain(rules.select_threshold(D, TAU), rules.l2_clip(L2),
                 rules.gaussian(SIGMA)), None, "passes τ"),
    ("threshold+clip+laplace: never a claim",
     rules.chain(rules.select_threshold(C_, TAU), rules.clip(GAMMA),
                 rules.laplace(B)), None, "passes τ"),
    ("random+l2+gaussian",
     rules.chain(rules.select_random(C_), rules.l2_clip(L2),
                 rules.gaussian(SIGMA)),
     _rdp_gaussian(SIGMA / (2 * L2), E, DELTA), None),
    ("dense l2+gaussian (DP-FedAvg)",
     rules.chain(rules.l2_clip(L2), rules.gaussian(SIGMA)),
     _rdp_gaussian(SIGMA / (2 * L2), E, DELTA), None),
    ("largest of all entries (θu = 1) is data-independent",
     rules.chain(rules.select_largest(D), rules.l2_clip(L2),
                 rules.gaussian(SIGMA)),
     _rdp_gaussian(SIGMA / (2 * L2), E, DELTA), None),
    ("random+clip+gaussian: L2 bound γ·√c",
     rules.chain(rules.select_random(C_), rules.clip(GAMMA),
                 rules.gaussian(SIGMA)),
     _rdp_gaussian(SIGMA / (2 * GAMMA * math.sqrt(C_)), E, DELTA), None),
    ("svt", rules.chain(rules.svt(C_, EPS, GAMMA, TAU)), E * EPS, None),
    ("largest then svt",
     rules.chain(rules.select_largest(C_), rules.svt(C_, EPS, GAMMA, TAU)),
     None, "data-independent set"),
    ("random+laplace without a bound",
     rules.chain(rules.select_random(C_), rules.laplace(B)), None,
     "unbounded"),
    ("no noise", rules.chain(rules.select_random(C_), rules.clip(GAMMA)),
     None, "no rule adds noise"),
    ("noise then largest: post-processing",
     rules.chain(rules.l2_clip(L2), rules.gaussian(SIGMA),
                 rules.select_largest(C_)),
     _rdp_gaussian(SIGMA / (2 * L2), E, DELTA), None),
    ("nothing uploaded", None, 0.0, None),
]


@pytest.mark.parametrize("name,rule,want,reason", CLAIMS,
                         ids=[c[0] for c in CLAIMS])
def test_claim_equals_an_independent_computation(name, rule, want, reason):
  claim = rules.claim(rule, D, E, DELTA)
  if want is None:
    assert claim.epsilon is None
    assert reason in claim.reason, claim.reason
    assert claim.reason.endswith(".") and "\n" not in claim.reason
  else:
    assert claim.reason is None
    assert claim.epsilon == pytest.approx(want, rel=1e-9)


def test_gaussian_claim_matches_the_accounting_module():
  # The chain's ε equals accounting.gaussian_epsilon(σ/C) (replace adjacency).
  rule = rules.chain(rules.select_random(C_), rules.l2_clip(L2),
                     rules.gaussian(SIGMA))
  assert rules.claim(rule, D, E, DELTA).epsilon == pytest.approx(
      accounting.gaussian_epsilon(SIGMA / L2, E, DELTA), rel=1e-9)


@pytest.mark.parametrize("flags,want", [
    # The two wrong claims of the old if-chain:
    (dict(selection="threshold", upload_fraction=1.0, noise="gaussian",
          noise_scale=SIGMA, l2_clip=L2), None),
    (dict(selection="random", noise="laplace", noise_scale=B,
          clip_bound=GAMMA), "laplace"),
    (dict(noise="svt", epsilon=EPS, clip_bound=GAMMA), "svt"),
    (dict(algorithm="centralized", upload_fraction=0.1), None),
    (dict(algorithm="standalone"), 0.0),
])
def test_run_layer_claims(flags, want):
  base = config_lib.Config(dataset="digits", model="digits_mlp",
                           num_participants=4, samples_per_participant=50)
  alg = flags.pop("algorithm", "dssgd")
  cfg = build.validate(build.for_algorithm(base, alg, **flags))
  d = 4810  # digits_mlp
  c = selection.upload_count(cfg.upload_fraction, d)
  claim = build.claim(cfg, d, E)
  if want is None:
    assert claim.epsilon is None and claim.reason
  elif want == "laplace":
    assert claim.epsilon == pytest.approx(E * 2 * GAMMA * c / B)
  elif want == "svt":
    assert claim.epsilon == pytest.approx(E * EPS)
  else:
    assert claim.epsilon == want


# ----------------------------------------------------------------------------
# Rules do what they say.


def test_chain_applies_in_order_and_keeps_static_shapes():
  delta = jnp.array([0.5, -3.0, 0.02, 2.0, -0.01, 0.0])
  rule = rules.chain(rules.select_largest(3), rules.clip(1.0))
  up = jax.jit(rule.apply)(rules.dense(delta), jax.random.key(0))
  assert up.indices.tolist() == [0, 1, 3]
  assert up.values.tolist() == [0.5, -1.0, 1.0]
  ups = jax.vmap(rule.apply, in_axes=(0, None))(
      jax.vmap(rules.dense)(jnp.stack([delta, -delta])), jax.random.key(0))
  assert ups.indices.shape == (2, 3)


def test_threshold_keeps_only_passing_entries():
  delta = jnp.array([0.5, 0.0, -0.7, 0.001, 0.2])
  up = rules.select_threshold(10, 0.1).apply(rules.dense(delta),
                                             jax.random.key(1))
  assert sorted(up.indices[up.mask].tolist()) == [0, 2, 4]


def test_svt_rule_releases_bounded_values():
  delta = jax.random.normal(jax.random.key(0), (500,))
  up = rules.svt(20, 1e6, 0.1, 0.05).apply(rules.dense(delta),
                                          jax.random.key(2))
  assert int(up.mask.sum()) == 20
  assert float(jnp.max(jnp.abs(up.values))) <= 0.1 + 1e-7


# ----------------------------------------------------------------------------
# Random selection and random downloads are exactly uniform.


def _subset_counts(masks):
  d = masks.shape[1]
  codes = (masks.astype(np.int64) * (1 << np.arange(d))).sum(1)
  _, counts = np.unique(codes, return_counts=True)
  return counts


def test_random_selection_is_uniform_over_subsets():
  keys = jax.random.split(jax.random.key(3), 20000)
  rule = rules.select_random(2)
  ups = jax.jit(jax.vmap(lambda k: rule.apply(rules.dense(jnp.zeros(5)), k)))(
      keys)
  masks = np.zeros((20000, 5), bool)
  np.put_along_axis(masks, np.asarray(ups.indices), True, axis=1)
  counts = _subset_counts(masks)
  assert len(counts) == 10  # every 2-subset of 5 appears
  assert stats.chisquare(counts).pvalue > P_MIN


def test_random_download_is_uniform_over_subsets():
  state = server_lib.init(jnp.zeros(5))
  keys = jax.random.split(jax.random.key(4), 20000)
  masks = np.asarray(jax.jit(jax.vmap(
      lambda k: server_lib.download_random(2).mask(state, k)))(keys))
  assert np.all(masks.sum(1) == 2)
  counts = _subset_counts(masks)
  assert len(counts) == 10 and stats.chisquare(counts).pvalue > P_MIN


def test_random_ranks_have_no_ties_at_paper_scale():
  # float32 uniform priorities tie ~6,000 times on 313,546 entries (and the
  # ties went to the low indices); the ranks are a permutation of 1..D.
  d = 313_546
  ranks = np.asarray(selection.random_ranks(jax.random.key(5), d))
  np.testing.assert_array_equal(np.sort(ranks), np.arange(1, d + 1))
  u = np.asarray(jax.random.uniform(jax.random.key(5), (d,)))
  assert len(u) - len(np.unique(u)) > 1000  # what the old priorities did


def test_random_selection_has_no_low_index_bias():
  keys = jax.random.split(jax.random.key(6), 4000)
  rule = rules.select_random(1)
  idx = np.asarray(jax.jit(jax.vmap(
      lambda k: rule.apply(rules.dense(jnp.zeros(40)), k).indices[0]))(keys))
  counts = np.bincount(idx, minlength=40)
  assert stats.chisquare(counts).pvalue > P_MIN


# ----------------------------------------------------------------------------
# θd < 1 downloads exactly ceil(θd·D) entries, and bytes count pairs.


def test_download_fraction_downloads_exactly_its_count(tmp_path):
  cfg = build.validate(config_lib.Config(
      dataset="digits", model="digits_mlp", num_participants=3,
      samples_per_participant=30, batch_size=10, epochs=2, eval_examples=60,
      download_fraction=0.1, progress=False, workdir=str(tmp_path)))
  assert config_lib.resolved_download_rule(cfg) == "most_updated"
  summary = experiment.run(cfg, log=lambda m: None)
  d = 4810
  count = math.ceil(0.1 * d)
  rows = [__import__("json").loads(l) for l in open(tmp_path / "metrics.jsonl")]
  for r in rows:
    assert r["downloaded_entries"] == count
    assert r["bytes_down"] == 8.0 * count  # (int32 index, float32 value)
    assert r["bytes_up"] == 8.0 * math.ceil(0.1 * d)
  assert summary["bytes_down_total"] == 2 * 8.0 * count


# ----------------------------------------------------------------------------
# FedAvg weighs by example counts.


# ----------------------------------------------------------------------------
# The layers (issue "Compose in code, run like the command line"): the
# library (pure functions, explicit arguments), the run layer
# (dssgd_jax/run/), the tools above it (dssgd_jax/tools/) and the
# deployment (dssgd_jax/flower/); the entry points (main.py and the thin
# `python -m dssgd_jax.<tool>` modules) may import anything.

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dssgd_jax"
ENTRY_POINTS = {"main", "audit", "audit_rule", "plot", "reproduce",
                "privacy_table", "bench", "bench_scale"}
LAYERS = ("library", "run", "tools", "flower")
ALLOWED = {"library": {"library"}, "run": {"library", "run"},
           "tools": {"library", "run", "tools"},
           "flower": {"library", "run", "flower"}}


def _layer(module: str) -> str:
  parts = module.split(".")
  if len(parts) > 1 and parts[1] in ("run", "tools", "flower"):
    return parts[1]
  return "library"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
  base = PACKAGE.parent / dotted.replace(".", "/")
  return base.with_suffix(".py").exists() or base.is_dir()


def _imports(path: pathlib.Path) -> set[str]:
  """The dssgd_jax modules ``path`` imports (top level or in a function);
  ``from package import module`` counts as the module."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      subs = [f"{node.module}.{a.name}" for a in node.names
              if _is_module(f"{node.module}.{a.name}")]
      names.update(subs or [node.module])
  return {n for n in names if n.startswith("dssgd_jax") and n != "dssgd_jax"}


def _modules() -> dict:
  """Every module of the package but the entry points."""
  out = {}
  for path in PACKAGE.rglob("*.py"):
    if (path.parent == PACKAGE and path.stem in ENTRY_POINTS) or (
        path.stem == "__main__"):
      continue
    out[_module_name(path)] = path
  return out


def test_no_layer_imports_a_layer_above_it():
  modules = _modules()
  assert {_layer(m) for m in modules} == set(LAYERS)
  assert len([m for m in modules if _layer(m) == "library"]) > 15
  for name, path in modules.items():
    for imp in _imports(path):
      assert _layer(imp) in ALLOWED[_layer(name)], (
          f"{name} ({_layer(name)}) imports {imp} ({_layer(imp)})")
  # The entry points are thin: a few lines each.
  for stem in ENTRY_POINTS - {"main"}:
    assert len((PACKAGE / f"{stem}.py").read_text().splitlines()) <= 10, stem


def test_imports_have_no_cycles():
  modules = _modules()
  graph = {m: {i for i in _imports(p) if i in modules and i != m}
           for m, p in modules.items()}
  done, stack = set(), []

  def visit(m):
    if m in stack:
      raise AssertionError("import cycle: " + " -> ".join(
          stack[stack.index(m):] + [m]))
    if m not in done:
      stack.append(m)
      for n in sorted(graph[m]):
        visit(n)
      stack.pop()
      done.add(m)

  for m in sorted(graph):
    visit(m)


def test_no_module_uses_another_modules_private_names():
  """Private helper modules (``_topk``, ``_io``) are imported by name; a
  private function or constant of another module never is."""
  for name, path in _modules().items():
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
          "dssgd_jax"):
        for a in node.names:
          full = f"{node.module}.{a.name}"
          aliases[a.asname or a.name] = full
          assert not a.name.startswith("_") or _is_module(full), (
              f"{name} imports the private {full}")
      elif isinstance(node, ast.Import):
        aliases.update({a.asname or a.name: a.name for a in node.names
                        if a.name.startswith("dssgd_jax")})
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")
          and not _is_module(f"{aliases[node.value.id]}.{node.attr}")):
        raise AssertionError(f"{name} uses {aliases[node.value.id]}."
                             f"{node.attr}, a private name of another module")


@pytest.mark.parametrize("module", [
    "dssgd_jax.rules", "dssgd_jax.selection", "dssgd_jax.server",
    "dssgd_jax.protocols", "dssgd_jax.algorithms", "dssgd_jax.accounting",
    "dssgd_jax._io", "dssgd_jax.run.config", "dssgd_jax.run.build",
    "dssgd_jax.run.experiment"])
def test_docstring_examples(module):
  import doctest  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(importlib.import_module(module))
  assert result.attempted > 0 and result.failed == 0, result

"""Discriminator heads: shapes, the official DMD2 head's numerics, multi-head averaging,
initialisation, gradients, jit and bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adm_jax import tree
from adm_jax.models import disc_heads
from adm_jax.models.disc_heads import (ADMHead2D, DMD2Head, HEADS, MultiHeadDiscriminator,
                                       make_head)

C = 64          # feature channels (GroupNorm(32) needs a multiple of 32)
HIDDEN = 64


# XLA:CPU compile time dominates this file: the models are initialised with the cheap
# "rbg" PRNG (threefry's random-number programs take seconds each to compile) and every
# forward / gradient runs through one jitted function per model structure and shape.

def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _feat(batch, h, w=None, c=C, seed=0):
  w = h if w is None else w
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, h, w, c)),
                     jnp.float32)


@jax.jit(static_argnums=(0, 3))
def _apply(graphdef, state, args, per_head):
  model = nnx.merge(graphdef, state)
  return model(*args, return_per_head=True) if per_head else model(*args)


def _run(model, *args, per_head=False):
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, args, per_head)


@jax.jit(static_argnums=0)
def _param_grads(graphdef, params, rest, features):
  loss = lambda p, f: jnp.sum(nnx.merge(graphdef, p, rest)(f))
  return jax.grad(loss, argnums=(0, 1))(params, features)


def _grads(model, features):
  """d(sum of logits)/d(every parameter) as a flat dict, and d/d(features)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  g_params, g_features = _param_grads(graphdef, params, rest, features)
  return tree.flatten(g_params), g_features


# --------------------------------------------------------------------------- DMD2 head

@pytest.mark.parametrize("resolution,num_down", [(32, 3), (16, 2), (8, 1), (4, 0)])
def test_dmd2_head_shapes(resolution, num_down):
  """SDXL's 32x32 mid block -> three stride-2 blocks, SD1.5's 8x8 -> one (Addendum)."""
  head = DMD2Head(C, resolution, rngs=_rngs())
  assert head.num_down == num_down
  for batch in (1, 3):
    out = _run(head, _feat(batch, resolution))
    assert out.shape == (batch,) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_dmd2_head_matches_official_torch():
  """Same weights through the official ``cls_pred_branch`` (torch, NCHW) give the same
  logits."""
  torch = pytest.importorskip("torch")
  nn = torch.nn
  for resolution in (8, 32):
    head = DMD2Head(C, resolution, rngs=_rngs(resolution))
    n = head.num_down
    mods = []
    for _ in range(n):
      mods += [nn.Conv2d(C, C, 4, stride=2, padding=1), nn.GroupNorm(32, C), nn.SiLU()]
    mods += [nn.Conv2d(C, C, 4, stride=4, padding=0), nn.GroupNorm(32, C), nn.SiLU(),
             nn.Conv2d(C, 1, 1, stride=1, padding=0)]
    ref = nn.Sequential(*mods)
    blocks = list(head.down) + [head.pool]
    sd = {}
    rng = np.random.default_rng(0)
    for i, block in enumerate(blocks):
      sd[f"{3 * i}.weight"] = np.asarray(block.conv.kernel[...]).transpose(3, 2, 0, 1)
      sd[f"{3 * i}.bias"] = np.asarray(block.conv.bias[...])
      # Non-trivial norm affine parameters, set on both sides.
      scale = (1 + 0.2 * rng.standard_normal(C)).astype(np.float32)
      bias = (0.2 * rng.standard_normal(C)).astype(np.float32)
      block.norm.scale[...] = jnp.asarray(scale)
      block.norm.bias[...] = jnp.asarray(bias)
      sd[f"{3 * i + 1}.weight"], sd[f"{3 * i + 1}.bias"] = scale, bias
    sd[f"{3 * n + 3}.weight"] = np.asarray(head.out.kernel[...]).transpose(3, 2, 0, 1)
    sd[f"{3 * n + 3}.bias"] = np.asarray(head.out.bias[...])
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    x = np.asarray(_feat(2, resolution, seed=resolution))
    with torch.no_grad():
      nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      want = ref(nchw).squeeze(dim=[2, 3])[:, 0].numpy()
    got = _run(head, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_dmd2_head_torch_default_init():
  head = DMD2Head(C, 8, rngs=_rngs())
  bound = 1 / np.sqrt(C * 16)
  k = np.asarray(head.down[0].conv.kernel[...])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  assert np.abs(np.asarray(head.down[0].conv.bias[...])).max() > 0


def test_dmd2_head_errors():
  for resolution in (12, 2, (16, 8)):
    with pytest.raises(ValueError, match="power-of-two"):
      DMD2Head(C, resolution, rngs=_rngs())
  head = DMD2Head(C, 8, rngs=_rngs())
  with pytest.raises(ValueError, match="8x8"):
    head(_feat(1, 16))


# --------------------------------------------------------------------------- ADM 2D head

@pytest.mark.parametrize("resolution,num_down", [
    (64, 3), (8, 3), (4, 2), (3, 1), (2, 1), (1, 0), ((16, 2), 1), ((1, 9), 0)])
def test_admhead2d_shapes_and_small_maps(resolution, num_down):
  head = ADMHead2D(C, resolution=resolution, hidden=HIDDEN, zero_init_out=False,
                   rngs=_rngs())
  assert head.num_down == num_down
  h, w = disc_heads._hw(resolution)
  out = _run(head, _feat(2, h, w))
  assert out.shape == (2,) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


def test_admhead2d_zero_init_and_too_small_input():
  head = ADMHead2D(C, hidden=HIDDEN, rngs=_rngs())      # num_down=3, no resolution
  assert head.num_down == 3
  assert np.array_equal(np.asarray(_run(head, _feat(3, 16))), np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="resolution="):
    head(_feat(1, 4))


def test_admhead2d_hidden_and_input_projection():
  head = ADMHead2D(48, resolution=16, hidden=32, groups=8, rngs=_rngs())
  assert head.down[0].conv.kernel.shape == (4, 4, 48, 32)
  assert head.conv.conv.kernel.shape == (3, 3, 32, 32)
  assert head.out.kernel.shape == (32, 1)
  flat = ADMHead2D(48, resolution=1, hidden=32, groups=8, rngs=_rngs())
  assert flat.conv.conv.kernel.shape == (3, 3, 48, 32)     # the 3x3 conv projects


# --------------------------------------------------------------------------- multi-head

ADM_KW = dict(hidden=HIDDEN, zero_init_out=False)
# Per kind: feature specs and head options. Tests share them so that they share compiles.
CASES = {
    "admhead2d": ({"down_1": (32, 16), "mid": (C, 8), "up_0": (C, (8, 4))}, ADM_KW),
    "dmd2": ({"mid": (C, 8), "down_2": (C, 16)}, {}),
}


def _features(specs, batch=2, seed=0):
  """Features for ``specs`` plus one the discriminator must ignore."""
  feats = {name: _feat(batch, *disc_heads._hw(res), c=ch, seed=seed + i)
           for i, (name, (ch, res)) in enumerate(specs.items())}
  feats["unused"] = jnp.zeros((batch, 5, 5, 7))
  return feats


@pytest.mark.parametrize("kind", sorted(CASES))
def test_multihead_is_mean_of_heads(kind):
  specs, kw = CASES[kind]
  disc = MultiHeadDiscriminator(specs, kind, rngs=_rngs(), **kw)
  feats = _features(specs)
  logits, per_head = _run(disc, feats, per_head=True)
  assert logits.shape == (2,) and logits.dtype == jnp.float32
  assert sorted(per_head) == sorted(specs)
  singles = [_run(disc.heads[name], feats[name]) for name in specs]
  np.testing.assert_allclose(np.asarray(logits), np.mean(np.stack(singles), axis=0),
                             atol=1e-6, rtol=0)
  for name, single in zip(specs, singles):
    np.testing.assert_array_equal(np.asarray(per_head[name]), np.asarray(single))
  # The heads differ (independent initialisations), so the mean is not trivial.
  assert not np.allclose(singles[0], singles[1])


def test_multihead_missing_feature_and_bad_names():
  specs, kw = CASES["admhead2d"]
  disc = MultiHeadDiscriminator(specs, rngs=_rngs(), **kw)
  feats = _features(specs)
  del feats["mid"]
  with pytest.raises(KeyError, match="mid"):
    disc(feats)
  with pytest.raises(ValueError, match="'a.b'"):
    MultiHeadDiscriminator({"a.b": (C, 8)}, rngs=_rngs())
  with pytest.raises(ValueError, match="unknown discriminator head 'conv3d'"):
    MultiHeadDiscriminator({"mid": (C, 8)}, "conv3d", rngs=_rngs())
  assert set(HEADS) >= {"dmd2", "admhead2d"}


def test_registered_head_kind():
  """New head kinds (e.g. 3-D video heads) plug into the factory by name."""
  class Toy3D(nnx.Module):
    def __init__(self, channels, *, resolution, dtype, param_dtype, rngs, scale=1.0):
      self.resolution = resolution
      self.w = nnx.Param(jnp.full((channels,), scale, param_dtype))

    def __call__(self, feat):                         # [B, t, h, w, c]
      return jnp.einsum("bthwc,c->b", feat, self.w[...]).astype(jnp.float32)

  disc_heads.register_head("toy3d")(Toy3D)
  try:
    with pytest.raises(ValueError, match="already registered"):
      disc_heads.register_head("toy3d")(Toy3D)
    head = make_head("toy3d", 4, (2, 3, 3), rngs=_rngs(), scale=2.0)
    assert head.resolution == (2, 3, 3)
    disc = MultiHeadDiscriminator({"v": (4, (2, 3, 3))}, "toy3d", rngs=_rngs())
    out = disc({"v": jnp.ones((2, 2, 3, 3, 4))})
    np.testing.assert_allclose(np.asarray(out), [72.0, 72.0])
  finally:
    HEADS.pop("toy3d", None)


# --------------------------------------------------------------------------- training use

@pytest.mark.parametrize("kind", sorted(CASES))
def test_gradients_reach_every_parameter_and_feature(kind):
  specs, kw = CASES[kind]
  disc = MultiHeadDiscriminator(specs, kind, rngs=_rngs(), **kw)
  feats = _features(specs)
  grads, feat_grads = _grads(disc, feats)
  assert grads and all(k.startswith("heads.") for k in grads)
  dead = [k for k, g in grads.items() if not float(jnp.abs(g).max()) > 0]
  assert not dead, dead
  assert all(float(jnp.abs(feat_grads[n]).max()) > 0 for n in specs)   # to the backbone
  assert not float(jnp.abs(feat_grads["unused"]).max())


def test_zero_init_output():
  """A zero output layer gives zero logits at initialisation; at step 0 only it gets a
  gradient (which is enough to move it; then the rest of the head receives gradients)."""
  specs, kw = CASES["admhead2d"]
  disc = MultiHeadDiscriminator(specs, rngs=_rngs(), **(kw | dict(zero_init_out=True)))
  feats = _features(specs)
  assert np.array_equal(np.asarray(_run(disc, feats, per_head=True)[0]),
                        np.zeros(2, np.float32))
  grads, _ = _grads(disc, feats)
  for name in specs:
    assert float(jnp.abs(grads[f"heads.{name}.out.kernel"]).max()) > 0
    assert float(jnp.abs(grads[f"heads.{name}.out.bias"]).max()) > 0
    assert not float(jnp.abs(grads[f"heads.{name}.conv.conv.kernel"]).max())


def test_jit_matches_eager():
  head = DMD2Head(C, 8, rngs=_rngs(1))
  x = _feat(2, 8)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, f: m(f))(head, x)),
                             np.asarray(head(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bfloat16_compute_returns_float32(kind):
  specs, kw = CASES[kind]
  feats = _features(specs)
  ref = MultiHeadDiscriminator(specs, kind, rngs=_rngs(), **kw)
  low = MultiHeadDiscriminator(specs, kind, dtype=jnp.bfloat16, rngs=_rngs(), **kw)
  out = _run(low, {n: f.astype(jnp.bfloat16) for n, f in feats.items()})
  assert out.dtype == jnp.float32 and out.shape == (2,)
  params = tree.flatten(nnx.state(low, nnx.Param))
  assert all(v.dtype == jnp.float32 for v in params.values())
  want = _run(ref, feats, per_head=True)[0]
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=0.1, rtol=0.05)

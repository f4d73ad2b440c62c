"""SDXL UNet: torch parity, export round trip, features, conversion errors."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from adm_jax import tree  # noqa: E402
from adm_jax.convert import common  # noqa: E402
from adm_jax.convert import unet as convert_unet  # noqa: E402
from adm_jax.models.unet import UNetConfig  # noqa: E402

# The SDXL text_time family at small width (jax_stack.md §2.3), plus a variant with 1x1
# conv projections, a cross-attention first block and uneven transformer depths.
SDXL_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=8)
CONV_PROJ = dict(
    sample_size=16, in_channels=4, out_channels=3, block_out_channels=(16, 32, 32),
    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, use_linear_projection=False, transformer_layers_per_block=(2, 1, 1),
    cross_attention_dim=24, norm_num_groups=4)


def _build(cfg, path):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**cfg).eval()
  with torch.no_grad():   # non-trivial norms and biases, so every tensor matters
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def sdxl_tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("unet") / "unet"
  return _build(SDXL_TINY, path), path


def _inputs(b, cfg, seed):
  rng = np.random.default_rng(seed)
  s = cfg["sample_size"]
  x = rng.standard_normal((b, cfg["in_channels"], s, s)).astype(np.float32)
  t = rng.choice([0.0, 1.0, 250.0, 399.0, 999.0, 517.5], size=b).astype(np.float32)
  cond = dict(context=rng.standard_normal((b, 7, cfg["cross_attention_dim"])).astype(
      np.float32))
  if cfg.get("addition_embed_type") == "text_time":
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg[
        "addition_time_embed_dim"]
    cond["pooled"] = rng.standard_normal((b, pooled_dim)).astype(np.float32)
    cond["time_ids"] = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32),
                               (b, 1)) * rng.uniform(0.2, 1.0, (b, 1)).astype(np.float32)
  return x, t, cond


def _torch_forward(model, x, t, cond):
  kw = {}
  if "pooled" in cond:
    kw["added_cond_kwargs"] = dict(text_embeds=torch.from_numpy(cond["pooled"]),
                                   time_ids=torch.from_numpy(cond["time_ids"]))
  with torch.no_grad():
    out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond["context"]),
                **kw).sample
  return out.numpy().transpose(0, 2, 3, 1)                # -> [B, H, W, C]


def _ours(path, **kw):
  cfg, graphdef, params = convert_unet.load(path, **kw)
  return cfg, graphdef, params, nnx.merge(graphdef, params)


@pytest.mark.parametrize("batch,seed", [(1, 0), (3, 1), (4, 2)])
def test_sdxl_unet_matches_diffusers(sdxl_tiny, batch, seed):
  model, path = sdxl_tiny
  _, _, _, ours = _ours(path)
  x, t, cond = _inputs(batch, SDXL_TINY, seed)
  ref = _torch_forward(model, x, t, cond)
  out = jax.jit(lambda x, t, c: ours(x, t, c))(x.transpose(0, 2, 3, 1), t, cond)
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_both_conv_lowerings_match_diffusers_and_their_grads_agree(sdxl_tiny):
  """Both ways our convolutions lower (one XLA convolution, or patches + one matmul)
  give diffusers' output, and the same gradient for every parameter."""
  from adm_jax.models import layers
  model, path = sdxl_tiny
  _, graphdef, params, _ = _ours(path)
  x, t, cond = _inputs(2, SDXL_TINY, 4)
  ref = _torch_forward(model, x, t, cond)
  x = x.transpose(0, 2, 3, 1)

  def loss(p):
    out = nnx.merge(graphdef, p)(x, t, cond)
    return jnp.sum(jnp.square(out)), out
  grads = {}
  for lowering in ("xla", "patches"):
    with layers.conv_lowering(lowering):
      grads[lowering], out = jax.jit(jax.grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0, err_msg=lowering)
  got, want = tree.flatten(grads["patches"]), tree.flatten(grads["xla"])
  assert got.keys() == want.keys()
  for k, w in want.items():
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(got[k]), w, rtol=2e-4,
                               atol=2e-4 * float(np.abs(w).max()) + 1e-7, err_msg=k)


def test_conv_lowering_choices():
  from adm_jax.models import layers
  rngs = nnx.Rngs(0)
  wide = jnp.ones((2, 8, 8, 128))
  conv = layers.Conv2d(128, 8, 3, padding=1, rngs=rngs)
  down = layers.Conv2d(16, 8, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)
  pick = lambda m, x: layers._use_patches(x, m.kernel_size, m.strides, m.padding)
  # auto on CPU: patches for small, wide layers only; never for 1x1 kernels.
  assert pick(conv, wide) and not pick(conv, jnp.ones((2, 32, 32, 128)))
  assert not pick(conv, jnp.ones((2, 8, 8, 64)))
  one = layers.Conv2d(128, 8, 1, rngs=rngs)
  assert not pick(one, wide)
  with layers.conv_lowering("xla"):
    assert not pick(conv, wide)
  with layers.conv_lowering("patches"):
    assert pick(down, jnp.ones((2, 9, 9, 16))) and not pick(one, wide)
    # Strided, asymmetric padding (the VAE encoder's downsampler) agrees too.
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
    got = down(x)
  with layers.conv_lowering("xla"):
    want = down(x)
  assert got.shape == want.shape == (2, 4, 4, 8)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="unknown conv lowering 'im2col'; valid: auto, xla"):
    with layers.conv_lowering("im2col"):
      pass


def test_conv_projection_variant_matches_diffusers(tmp_path):
  model = _build(CONV_PROJ, tmp_path / "unet")
  _, _, _, ours = _ours(tmp_path / "unet")
  x, t, cond = _inputs(2, CONV_PROJ, 3)
  np.testing.assert_allclose(np.asarray(ours(x.transpose(0, 2, 3, 1), t, cond)),
                             _torch_forward(model, x, t, cond), atol=1e-4, rtol=0)


def test_export_round_trip_is_exact_and_loads_in_diffusers(sdxl_tiny, tmp_path):
  model, path = sdxl_tiny
  cfg, _, params, ours = _ours(path)
  out_dir = convert_unet.export(cfg, params, tmp_path / "exported")
  # ours -> diffusers -> ours is bit-exact.
  cfg2, _, params2, _ = _ours(out_dir)
  assert cfg2 == cfg
  a, b = tree.flatten(params), tree.flatten(params2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  # diffusers loads the folder and agrees with our forward.
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(out_dir).eval()
  x, t, cond = _inputs(2, SDXL_TINY, 5)
  np.testing.assert_allclose(_torch_forward(reloaded, x, t, cond),
                             np.asarray(ours(x.transpose(0, 2, 3, 1), t, cond)), atol=1e-4)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  sd2 = {k: v.numpy() for k, v in reloaded.state_dict().items()}
  assert sd.keys() == sd2.keys()
  assert max(np.abs(sd[k] - sd2[k]).max() for k in sd) == 0.0


def test_features_come_from_the_same_pass(sdxl_tiny):
  _, path = sdxl_tiny
  _, _, _, ours = _ours(path)
  x, t, cond = _inputs(2, SDXL_TINY, 7)
  x = x.transpose(0, 2, 3, 1)
  out, feats = ours(x, t, cond, return_features=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ours(x, t, cond)))
  assert sorted(feats) == ["down_0", "down_1", "mid", "up_0", "up_1"]
  assert feats["down_0"].shape == (2, 8, 8, 32)   # after the first downsampler
  assert feats["mid"].shape == (2, 8, 8, 64)
  assert feats["up_1"].shape == (2, 16, 16, 32)


def test_bf16_compute_is_close_to_f32(sdxl_tiny):
  _, path = sdxl_tiny
  _, _, _, f32 = _ours(path)
  _, _, params, bf16 = _ours(path, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in tree.flatten(params).values())
  x, t, cond = _inputs(2, SDXL_TINY, 8)
  x = x.transpose(0, 2, 3, 1)
  a, b = np.asarray(f32(x, t, cond)), np.asarray(bf16(x, t, cond))
  assert b.dtype == np.float32
  err = np.abs(a - b).max() / np.abs(a).max()
  assert 0 < err < 0.1


def test_gradients_flow_to_every_parameter(sdxl_tiny):
  _, path = sdxl_tiny
  _, graphdef, params, _ = _ours(path)
  x, t, cond = _inputs(1, SDXL_TINY, 9)

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x.transpose(0, 2, 3, 1), t, cond) ** 2)
  grads = tree.flatten(jax.grad(loss)(params))
  zero = [k for k, g in grads.items() if not np.any(np.asarray(g))]
  assert not zero, zero


# ---------------------------------------------------------------- errors


def _copy(path, tmp_path):
  dst = tmp_path / "unet"
  shutil.copytree(path, dst)
  return dst


def test_missing_checkpoint_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    convert_unet.load(tmp_path / "nope")


def test_extra_and_missing_keys_are_named(sdxl_tiny, tmp_path):
  _, path = sdxl_tiny
  dst = _copy(path, tmp_path)
  f = dst / convert_unet.WEIGHTS
  tensors = dict(common.read_tensors(f))
  tensors["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
  del tensors["mid_block.resnets.1.conv2.bias"]
  f.unlink()
  common.write_safetensors(f, tensors)
  with pytest.raises(common.ConversionError) as e:
    convert_unet.load(dst)
  assert "down_blocks.0.resnets.0.extra.weight" in str(e.value)
  assert "mid_block.resnets.1.conv2.bias" in str(e.value)


def test_shape_mismatch_is_named(sdxl_tiny, tmp_path):
  _, path = sdxl_tiny
  dst = _copy(path, tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["cross_attention_dim"] = 32
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(common.ConversionError, match="attn2.to_k.kernel"):
    convert_unet.load(dst)


def test_pickle_needs_opt_in(sdxl_tiny, tmp_path):
  model, path = sdxl_tiny
  dst = tmp_path / "unet_bin"
  model.save_pretrained(dst, safe_serialization=False)
  assert not list(dst.glob("*.safetensors"))
  with pytest.raises(common.ConversionError, match="allow_pickle"):
    convert_unet.load(dst)
  _, _, params, _ = _ours(dst, allow_pickle=True)
  _, _, ref, _ = _ours(path)
  for k, v in tree.flatten(ref).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(tree.flatten(params)[k]))


def test_corrupt_safetensors_is_reported(sdxl_tiny, tmp_path):
  _, path = sdxl_tiny
  dst = _copy(path, tmp_path)
  f = dst / convert_unet.WEIGHTS
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(common.ConversionError, match="truncated or corrupt"):
    convert_unet.load(dst)


def test_unsupported_config_names_the_key():
  with pytest.raises(ValueError, match="class_embed_type"):
    UNetConfig.from_diffusers(dict(SDXL_TINY, class_embed_type="timestep"))
  with pytest.raises(ValueError, match="down_block_types.*SimpleCrossAttnDownBlock2D"):
    UNetConfig.from_diffusers(dict(SDXL_TINY, down_block_types=(
        "DownBlock2D", "SimpleCrossAttnDownBlock2D")))

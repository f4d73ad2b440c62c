"""The SDXL UNet under an 8-CPU-device mesh: FSDP-sharded params, data-sharded batch,
and a converted checkpoint restored straight into those shardings."""
import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from adm_jax import checkpoint, models, sharding, tree  # noqa: E402
from adm_jax.convert import unet as convert_unet  # noqa: E402
from test_unet import SDXL_TINY, _build, _inputs  # noqa: E402

RULES = [(r".*norm.*", "replicate"), (r".*", "fsdp")]


def test_fsdp_sharded_forward_equals_unsharded(tmp_path):
  assert jax.device_count() == 8
  _build(SDXL_TINY, tmp_path / "unet")
  cfg, graphdef, params = convert_unet.load(tmp_path / "unet")
  x, t, cond = _inputs(8, SDXL_TINY, 11)
  x = x.transpose(0, 2, 3, 1)

  def fwd(p, x, t, c):
    return nnx.merge(graphdef, p)(x, t, c)
  ref = np.asarray(jax.jit(fwd)(params, x, t, cond))

  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
  shardings = sharding.infer_param_shardings(params, RULES, mesh)
  sharded = sharding.shard_params(params, shardings)
  flat = tree.flatten(sharded)
  kernel = flat["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  assert kernel.addressable_shards[0].data.size * 4 == kernel.size
  assert flat["conv_norm_out.scale"].sharding.is_fully_replicated

  batch = lambda a: sharding.batch_sharding(mesh, np.ndim(a))
  inputs = (x, t, cond)
  in_sh = jax.tree.map(batch, inputs)
  out = jax.jit(fwd, in_shardings=(shardings, *in_sh), out_shardings=batch(x))(
      sharded, *jax.device_put(inputs, in_sh))
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)

  # Our converted-checkpoint format restores onto the mesh directly.
  meta = dict(family="sdxl", component="unet", kind="unet", config=cfg.to_diffusers())
  checkpoint.save_params(tmp_path / "ours", params, meta)
  shard = lambda abstract: sharding.infer_abstract_params(abstract, RULES, mesh)
  cfg2, _, restored = models.load_component(tmp_path / "ours", shard=shard)
  assert cfg2 == cfg
  for k, v in tree.flatten(restored).items():
    assert v.sharding == tree.flatten(shardings)[k], k
    np.testing.assert_array_equal(np.asarray(v), np.asarray(tree.flatten(params)[k]))

"""The PyTorch DMD2 reference harness (benchmarks/dmd2_torch_reference.py) on a tiny
SDXL-architecture UNet: its DM loss against our JAX ``dm_loss``, the mid-block feature
path, and what one training iteration updates."""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_sdxl  # noqa: E402

from adm_jax import losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "dmd2_torch_reference", ROOT / "benchmarks" / "dmd2_torch_reference.py")
ref_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref_mod)

B, HW = 2, 8                   # tiny UNet: 8x8 latents -> 4x4 mid block (64 channels)


def _build(**kw):
  return ref_mod.build_reference(tiny_sdxl.UNET, batch=B, latent_hw=HW, **kw)


def _snapshot(module):
  return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
  """Names of the tensors of ``module`` that differ from ``before``."""
  return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("x0_dtype", [torch.float64, torch.float32])
def test_dm_loss_matches_jax(x0_dtype):
  """Value and d/dx of dm_loss_torch equal adm_jax.losses.dm_loss ([B,C,H,W] vs
  [B,H,W,C]); the harness feeds float64 x0 predictions, as the official code."""
  rng = np.random.default_rng(0)
  shape = (3, 4, HW, HW)
  x, r, f = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
  r[0], f[0] = x[0], x[0]      # x == x0_real == x0_fake on a sample: 0/0 -> nan_to_num -> 0

  xt = torch.tensor(x, requires_grad=True)
  loss_t = ref_mod.dm_loss_torch(xt, torch.tensor(r, dtype=x0_dtype),
                                 torch.tensor(f, dtype=x0_dtype))
  loss_t.backward()
  grad_t = xt.grad.numpy()

  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
  loss_j, grad_j = jax.value_and_grad(lambda x_: losses.dm_loss(x_, nhwc(r), nhwc(f))[0])(
      nhwc(x))
  grad_j = np.asarray(grad_j).transpose(0, 3, 1, 2)

  assert loss_t.dtype == torch.float32 and np.isfinite(loss_t.item())
  np.testing.assert_allclose(loss_t.item(), float(loss_j), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_t, grad_j, rtol=1e-5, atol=1e-5)
  # The gradients are O(1 / numel): compare them at that scale too.
  np.testing.assert_allclose(grad_t * x.size, grad_j * x.size, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(grad_t[0], 0.0)
  # d loss / dx = (x0_fake - x0_real) / mean|x - x0_real| / numel (independent numpy).
  norm = np.abs(x - r).reshape(3, -1).mean(1)[1:, None, None, None]
  np.testing.assert_allclose(grad_t[1:], (f - r)[1:] / norm / x.size, rtol=1e-5, atol=1e-9)


def test_classify_forward_is_the_mid_block_output():
  """The head's input path (official classify_mode forward) equals the mid-block output of
  a full diffusers forward, and the head gives one logit per sample."""
  ref = _build()
  unet, c = ref.fake_unet, ref.cond
  x = torch.randn(B, 4, HW, HW)
  t = torch.tensor([10, 700])
  seen = {}
  hook = unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
  with torch.no_grad():
    unet(x, t, c["text_embedding"], added_cond_kwargs=c["unet_added_conditions"])
    mid = ref_mod.classify_forward(unet, x, t, c["text_embedding"],
                                   c["unet_added_conditions"])
    logits = ref.cls_pred_branch(mid).squeeze(dim=[1, 2, 3])
  hook.remove()
  assert mid.shape == (B, 64, HW // 2, HW // 2)
  torch.testing.assert_close(mid, seen["mid"], rtol=0, atol=0)
  assert logits.shape == (B,)


def test_iteration_updates_the_trainable_networks_only():
  ref = _build()
  real, gen = _snapshot(ref.real_unet), _snapshot(ref.generator)
  fake, head = _snapshot(ref.fake_unet), _snapshot(ref.cls_pred_branch)

  out = ref.iteration()

  assert set(out) == {"loss_fake_mean", "guidance_cls_loss", "guidance_loss", "loss_dm",
                      "gen_cls_loss", "generator_loss"}
  assert all(isinstance(v, float) and np.isfinite(v) for v in out.values()), out
  assert not _changed(real, ref.real_unet)
  assert all(not p.requires_grad for p in ref.real_unet.parameters())
  # Every parameter tensor of the generator, the fake UNet and the head moved (AdamW's
  # first step moves a parameter with a non-zero gradient by about lr = 5e-7).
  for before, net in ((gen, ref.generator), (fake, ref.fake_unet),
                      (head, ref.cls_pred_branch)):
    assert _changed(before, net) == set(before)
  assert all(p.grad is None for p in ref.generator.parameters())
  assert all(p.grad is None for p in ref.guidance_parameters())
  assert all(p.requires_grad for p in ref.guidance_parameters())


def test_turns_update_only_their_own_networks():
  """Gradient isolation (official train_one_step): the guidance turn leaves the generator
  alone, the generator turn (whose GAN term backpropagates through the fake UNet) leaves
  the fake UNet and the head alone."""
  ref = _build()
  gen, fake, head = (_snapshot(m) for m in (ref.generator, ref.fake_unet,
                                            ref.cls_pred_branch))
  ref.guidance_turn()
  assert not _changed(gen, ref.generator)
  assert _changed(fake, ref.fake_unet) and _changed(head, ref.cls_pred_branch)

  fake, head = _snapshot(ref.fake_unet), _snapshot(ref.cls_pred_branch)
  ref.generator_turn()
  assert _changed(gen, ref.generator)
  assert not _changed(fake, ref.fake_unet) and not _changed(head, ref.cls_pred_branch)


def test_without_gan():
  ref = _build(gan=False, cfg_scale=1.0)
  out = ref.iteration()
  assert set(out) == {"loss_fake_mean", "guidance_loss", "loss_dm", "generator_loss"}
  assert ref.cls_pred_branch is None
  assert all(np.isfinite(v) for v in out.values())

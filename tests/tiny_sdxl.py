"""A complete tiny SDXL pipeline (diffusers + transformers, saved as safetensors).

Built in tests only: two CLIP BPE tokenizers written from a small vocabulary, two CLIP
text encoders (the first with SDXL's legacy ``eos_token_id=2``), a ``text_time`` UNet
and a VAE, with the SDXL layout on disk (``unet/``, ``vae/``, ``text_encoder*/``,
``tokenizer*/``, ``scheduler/``).
"""
import json

WORDS = "a photo of cat dog red blue sitting on the mat astronaut riding horse"


def write_tokenizer(folder, pad_token, words=WORDS):
  """A tiny CLIP BPE tokenizer (byte-level alphabet, word merges, specials last) as a
  ``vocab.json`` + ``merges.txt`` folder like SDXL's ``tokenizer`` / ``tokenizer_2``."""
  from tokenizers import pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {}
  for suffix in ("", "</w>"):
    for c in alphabet:
      vocab[c + suffix] = len(vocab)
  merges = []
  for word in words.split():
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    cur = pieces[0]
    for piece in pieces[1:]:
      if f"{cur} {piece}" not in merges:
        merges.append(f"{cur} {piece}")
      cur += piece
      vocab.setdefault(cur, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)   # the highest id, as in CLIP
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"model_max_length": 77, "pad_token": pad_token}))
  return len(vocab)


def text_encoders(eos):
  import transformers
  common = dict(vocab_size=600, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, bos_token_id=eos - 1, pad_token_id=1)
  te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=32, hidden_act="quick_gelu", eos_token_id=2, **common)).eval()
  te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=48, projection_dim=40, hidden_act="gelu", eos_token_id=eos,
      **common)).eval()
  return te1, te2


UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=40 + 6 * 8,
    cross_attention_dim=32 + 48, norm_num_groups=8)
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
           layers_per_block=1, sample_size=32, scaling_factor=0.13025)


def build_pipeline(root, seed=0):
  """Writes the pipeline to ``root``; returns the diffusers pipeline object."""
  import diffusers
  import torch
  from adm_jax import conditioning
  n = write_tokenizer(root / "tokenizer", "<|endoftext|>")
  write_tokenizer(root / "tokenizer_2", "!")
  tok1 = conditioning.load_tokenizer(root / "tokenizer")
  tok2 = conditioning.load_tokenizer(root / "tokenizer_2")
  torch.manual_seed(seed)
  te1, te2 = text_encoders(eos=n - 1)
  unet = diffusers.UNet2DConditionModel(**UNET).eval()
  vae = diffusers.AutoencoderKL(**VAE).eval()
  scheduler = diffusers.EulerDiscreteScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      timestep_spacing="trailing", steps_offset=1)
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
      unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
  pipe.save_pretrained(root)
  return pipe

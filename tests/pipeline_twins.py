"""Complete tiny diffusers pipeline folders (transformer, text encoders, tokenizers, VAE, scheduler)."""

from __future__ import annotations

import numpy as np
import torch

from jaxdit.configs import get_config
from jaxdit.parity import randomize_weights
from text_twins import train_clip_tokenizer, train_t5_tokenizer

FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def tiny_vae(latent_channels: int, seed: int = 0, shift_factor: float | None = 0.1159,
             scaling_factor: float = 0.3611):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                        use_post_quant_conv=False)
    return randomize_weights(vae.eval(), seed)


def _text_encoders(tmp):
    import transformers as tf

    clip_tok = train_clip_tokenizer(tmp / "tok_clip")
    t5_tok, _ = train_t5_tokenizer(tmp / "tok_t5")
    clip_cfg = tf.CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=clip_tok.model_max_length,
                                 projection_dim=32, hidden_act="quick_gelu", eos_token_id=clip_tok.eos_token_id,
                                 bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.pad_token_id)
    t5_cfg = tf.T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return clip_tok, clip_cfg, t5_tok, t5_cfg


def flux_pipeline_folder(path, guidance: bool = True, seed: int = 0, kontext: bool = False):
    """Write a tiny FLUX (or Kontext) pipeline with diffusers' own save_pretrained; return the torch pipeline."""
    import transformers as tf
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel

    clip_tok, clip_cfg, t5_tok, t5_cfg = _text_encoders(path.parent / f"{path.name}_tokenizers")
    cfg = get_config("tiny-flux" if guidance else "tiny-flux-schnell").replace(
        joint_attention_dim=t5_cfg.d_model, pooled_projection_dim=clip_cfg.hidden_size)
    transformer = randomize_weights(FluxTransformer2DModel(**cfg.to_diffusers()).eval(), seed)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**(FLUX_SCHEDULER if guidance else
                                                     {"shift": 1.0, "use_dynamic_shifting": False})),
        text_encoder=randomize_weights(tf.CLIPTextModel(clip_cfg).eval(), seed + 1), tokenizer=clip_tok,
        text_encoder_2=randomize_weights(tf.T5EncoderModel(t5_cfg).eval(), seed + 2), tokenizer_2=t5_tok,
        vae=tiny_vae(cfg.in_channels // 4, seed + 3), transformer=transformer)
    pipe.save_pretrained(path)
    return pipe


def packed_noise(batch: int, channels: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Packed FLUX latents [B, (h/2)(w/2), 4C] from seeded noise, the same array for both frameworks."""
    from diffusers import FluxPipeline

    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, channels, h, w)).astype(np.float32))
    return FluxPipeline._pack_latents(noise, batch, channels, h, w).numpy()


def sd3_pipeline_folder(path, seed: int = 0, with_t5: bool = True):
    """Write a tiny SD3.5-style pipeline (CLIP-L, CLIP-G with projections, optional T5) with diffusers."""
    import transformers as tf
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tmp = path.parent / f"{path.name}_tokenizers"
    clip_tok, clip_cfg, t5_tok, t5_cfg = _text_encoders(tmp)
    clip_tok_2 = train_clip_tokenizer(tmp / "tok_clip_2")

    def clip(hidden, proj, s):
        cfg = tf.CLIPTextConfig(**{**clip_cfg.to_dict(), "hidden_size": hidden, "projection_dim": proj,
                                   "hidden_act": "gelu" if hidden > 32 else "quick_gelu"})
        return randomize_weights(tf.CLIPTextModelWithProjection(cfg).eval(), s)

    t5_cfg = tf.T5Config(**{**t5_cfg.to_dict(), "d_model": 96})
    cfg = get_config("tiny-sd3.5-large").replace(in_channels=4, out_channels=4, joint_attention_dim=96,
                                                 pooled_projection_dim=24 + 20, pos_embed_max_size=16)
    transformer = randomize_weights(SD3Transformer2DModel(**cfg.to_diffusers()).eval(), seed)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer, vae=tiny_vae(4, seed + 1, 0.0609,
                                                                                                      1.5305),
        text_encoder=clip(32, 24, seed + 2), tokenizer=clip_tok, text_encoder_2=clip(48, 20, seed + 3),
        tokenizer_2=clip_tok_2,
        text_encoder_3=randomize_weights(tf.T5EncoderModel(t5_cfg).eval(), seed + 4) if with_t5 else None,
        tokenizer_3=t5_tok if with_t5 else None)
    pipe.save_pretrained(path)
    return pipe

"""Tiny flow-matching pipelines (SD3 and Flux.1) with random weights, built offline in seconds.

    python tools/make_tiny_pipeline.py OUT_DIR --size tiny-sd3|tiny-flux|tiny-flux-schnell

Layout and classes are the real ones (model_index.json names StableDiffusion3Pipeline / FluxPipeline):
- SD3: text_encoder CLIP-L and text_encoder_2 CLIP-G (both CLIPTextModelWithProjection), text_encoder_3 T5,
  SD3Transformer2DModel with SD3.5's RMS q/k norm, a 16-channel VAE with SD3's shift and scale.
- Flux.1: text_encoder CLIP-L (CLIPTextModel: Flux reads its pooled output only), text_encoder_2 T5,
  FluxTransformer2DModel with the guidance embedding of FLUX.1-dev (tiny-flux-schnell: without, as schnell),
  a 16-channel VAE with Flux's shift and scale.
Every encoder has its own width (SD3: 32, 48, 96; Flux: 32, 64), so mixing up encoders is a shape error. The
VAE downsamples 4x (the real ones 8x) so that 32-64 px images give a handful of transformer tokens.

The CLIP tokenizers use the real CLIP vocabulary (as the other sizes). The T5 tokenizer is a sentencepiece-like
Unigram model trained here with the `tokenizers` library on a small English corpus (the prompt templates filled
with common English words from the CLIP vocabulary and the shapes world's words), so words such as "toy", "cat",
"star" are single tokens; like the real T5 it has <pad> 0, </s> 1, <unk> 2, appends </s>, and its embedding table
has more rows than the tokenizer has tokens (32128 for 32100 in t5-v1_1-xxl).
"""

import gzip
import json
import os
import string
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.make_tiny_pipeline import SDXL_PAD_TOKEN_2, find_clip_vocab, save_pipeline_folder, write_clip_tokenizer_files  # noqa: E402

CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                layer_norm_eps=1e-5)
SD3_WIDTHS = {"clip_l": 32, "clip_g": 48, "t5xxl": 96}
FLUX_WIDTHS = {"clip_l": 32, "t5xxl": 64}
T5_VOCAB_TARGET = 4000
T5_ROW_MULTIPLE = 128  # t5-v1_1: 32100 tokens, 32128 embedding rows
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's spiece model
# Words every test or demo may use as an initializer: each must be one T5 token.
T5_WORDS = ("toy", "cat", "dog", "car", "star", "shape", "circle", "square", "triangle", "cross", "red", "green",
            "blue", "purple", "yellow", "orange", "white", "black", "photo", "painting", "style", "object", "thing")
# The real VAEs' latent statistics (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev).
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)


def t5_corpus(num_words=1500):
    """English sentences for the T5 tokenizer: templates filled with the CLIP vocabulary's most frequent whole
    words and the T5_WORDS (and the shapes world's words), each word also plural and followed by punctuation
    (tokenizers' Unigram trainer seeds its pieces from distinct pre-tokenized words, so a word met in one form
    only would never become a piece), and every printable ASCII character."""
    from textual_inversion_core.data import OBJECT_TEMPLATES, STYLE_TEMPLATES
    from tools.shapes import COLOURS, SHAPES

    merges = gzip.open(find_clip_vocab()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    common = []
    for line in merges:  # merge order is frequency order
        word = "".join(line.split())
        if word.endswith("</w>") and word[:-4].isascii() and word[:-4].isalpha() and len(word) > 5:
            common.append(word[:-4])
    words = list(dict.fromkeys(common[:num_words] + list(T5_WORDS) + list(SHAPES) + list(COLOURS)))
    templates = OBJECT_TEMPLATES + STYLE_TEMPLATES
    corpus = []
    for i, word in enumerate(words):
        repeats = 20 if word in T5_WORDS else 1
        for j in range(repeats):
            corpus += [templates[(i + j) % len(templates)].format(word) + ".", f"two {word}s, one {word}; {word}!"]
    corpus.append(string.printable)
    return corpus


def train_t5_tokenizer(folder):
    """Train the Unigram T5 tokenizer and save tokenizer.json + tokenizer_config.json in folder (what
    T5TokenizerFast.from_pretrained reads without sentencepiece). Returns the number of tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=T5_VOCAB_TARGET, special_tokens=list(T5_SPECIAL), unk_token="<unk>",
                                      initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
                                      show_progress=False)
    tokenizer.train_from_iterator(t5_corpus(), trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", eos)])
    assert [tokenizer.token_to_id(t) for t in T5_SPECIAL] == [0, 1, 2]
    split = [w for w in T5_WORDS if len(tokenizer.encode(w, add_special_tokens=False).ids) != 1]
    assert not split, f"T5 tokenizer splits {split}"
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
              "model_max_length": 512, "extra_ids": 0, "additional_special_tokens": []}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return tokenizer.get_vocab_size()


def t5_encoder(width, vocab_size):
    from transformers import T5Config, T5EncoderModel

    rows = -(-vocab_size // T5_ROW_MULTIPLE) * T5_ROW_MULTIPLE
    # t5-v1_1's shape at test size: gated-GELU feed-forward, untied embeddings, no dropout in training.
    config = T5Config(vocab_size=rows, d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config)


def clip_config(width, act, pad_token_id):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=3,
                          hidden_act=act, projection_dim=width, pad_token_id=pad_token_id, **CLIP_IDS)


def flow_vae(factors):
    from diffusers import AutoencoderKL

    # 16 latent channels and no quant convs, as SD3's and Flux's VAEs; 4x downsampling (theirs: 8x).
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                         latent_channels=16, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                         use_post_quant_conv=False, force_upcast=True, **factors)


def make_flow_pipeline(out_dir, size="tiny-flux", seed=0):
    """Write the tiny-sd3, tiny-flux or tiny-flux-schnell pipeline folder to out_dir."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        clip_dir, t5_dir = os.path.join(tmp, "clip"), os.path.join(tmp, "t5")
        write_clip_tokenizer_files(clip_dir, find_clip_vocab())
        t5_vocab = train_t5_tokenizer(t5_dir)
        tokenizer = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77)
        t5_tokenizer = T5TokenizerFast.from_pretrained(t5_dir)
        if size == "tiny-sd3":
            widths = SD3_WIDTHS
            torch.manual_seed(seed)
            transformer = SD3Transformer2DModel(
                sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=widths["t5xxl"],
                pooled_projection_dim=widths["clip_l"] + widths["clip_g"], pos_embed_max_size=32,
                qk_norm="rms_norm", dual_attention_layers=(0,))
            torch.manual_seed(seed + 1)
            vae = flow_vae(SD3_VAE_FACTORS)
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModelWithProjection(clip_config(widths["clip_l"], "quick_gelu", 49407))
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(clip_config(widths["clip_g"], "gelu", 0))
            torch.manual_seed(seed + 4)
            text_encoder_3 = t5_encoder(widths["t5xxl"], t5_vocab)
            tokenizer_2 = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77, pad_token=SDXL_PAD_TOKEN_2)
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3/SD3.5's
            pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                            text_encoder=text_encoder, tokenizer=tokenizer,
                                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                            text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer)
            tokenizer_folders = ("tokenizer", "tokenizer_2")
        elif size in ("tiny-flux", "tiny-flux-schnell"):
            widths = FLUX_WIDTHS
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=widths["t5xxl"], pooled_projection_dim=widths["clip_l"],
                guidance_embeds=size == "tiny-flux", axes_dims_rope=(4, 4, 8))
            torch.manual_seed(seed + 1)
            vae = flow_vae(FLUX_VAE_FACTORS)
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(clip_config(widths["clip_l"], "quick_gelu", 49407))
            torch.manual_seed(seed + 3)
            text_encoder_2 = t5_encoder(widths["t5xxl"], t5_vocab)
            # FLUX.1-dev's scheduler: the shift grows with the image's token count.
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                        base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                        max_image_seq_len=4096)
            pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer)
            tokenizer_folders = ("tokenizer",)
        else:
            raise ValueError(size)
        save_pipeline_folder(pipe, clip_dir, out_dir, tokenizer_folders=tokenizer_folders)
    return out_dir

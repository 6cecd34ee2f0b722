"""Files in the NBP authors' formats, written by the tests with random weights at reduced width, and an
independent reference of their generator's forward pass (written from their description: minGPT blocks,
their input sequences and attention masks), to check nbp_ds' conversions against."""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

# reduced sizes with the released structure
N_LAYER, D_MODEL, N_HEAD, BLOCK = 2, 32, 4, 4
GRID = (3, 4, 4)  # 9 frames at 32x32
VIDEO_CODES = 64
PREFIX = 8
CLASS_NAMES = ["ApplyEyeMakeup", "YoYo", "TaiChi", "PlayingDaf", "BlowingCandlesInTheWindAtTheParty"]
CORPUS = ("apply eye makeup yo yo tai chi playing daf blowing candles in the wind at the party "
          "apply lipstick archery baby crawling balance beam band marching baseball pitch basketball "
          "the quick brown fox jumps over the lazy dog while a band plays in the park\n")


def train_sentencepiece(folder: Path, vocab_size: int = 60) -> Path:
    """A small Llama-like sentencepiece model (unk 0, BOS 1, EOS 2, no pad) trained offline on CORPUS."""
    import sentencepiece

    text = folder / "corpus.txt"
    text.write_text(CORPUS * 20)
    prefix = folder / "spm"
    sentencepiece.SentencePieceTrainer.Train(
        input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return prefix.with_suffix(".model")


def released_generator_weights(kind: str, text_vocab: int = 0, seed: int = 0, n_layer: int = N_LAYER,
                               positions: int = 64, video_codes: int = VIDEO_CODES) -> dict[str, torch.Tensor]:
    """``transformer.*`` tensors of a released generator's structure (minGPT), random."""
    g = torch.Generator().manual_seed(seed)
    rows = video_codes if kind == "k600" else BLOCK + text_vocab + video_codes
    d = D_MODEL

    def rand(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    w = {"tok_emb.weight": rand(rows, d, std=1.0), "pos_emb": rand(1, positions, d, std=1.0),
         "ln_f.weight": 1 + rand(d, std=0.1), "ln_f.bias": rand(d, std=0.1), "head.weight": rand(rows, d, std=0.5)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        w |= {b + "ln1.weight": 1 + rand(d, std=0.1), b + "ln1.bias": rand(d, std=0.1),
              b + "ln2.weight": 1 + rand(d, std=0.1), b + "ln2.bias": rand(d, std=0.1),
              b + "mlp.0.weight": rand(4 * d, d), b + "mlp.0.bias": rand(4 * d, std=0.1),
              b + "mlp.2.weight": rand(d, 4 * d), b + "mlp.2.bias": rand(d, std=0.1)}
        for p in ("query", "key", "value", "proj"):
            w |= {b + f"attn.{p}.weight": rand(d, d), b + f"attn.{p}.bias": rand(d, std=0.1)}
    w["uncond_embedding"] = rand(PREFIX if kind == "ucf" else 0, d)  # a buffer of the released models
    return {"transformer." + k: v for k, v in w.items()}


def released_args(kind: str) -> argparse.Namespace:
    """The training args a released checkpoint stores in hyper_parameters (the fields the converter reads)."""
    common = dict(n_layer=N_LAYER, n_head=N_HEAD, n_embd=D_MODEL, token_number_per_step=BLOCK, semi_ar=True,
                  sequence_length=1 + 4 * (GRID[0] - 1), resolution=8 * GRID[1], vtokens_pos=False, block_size=64)
    if kind == "ucf":
        return argparse.Namespace(**common, hybrid=True, cond_stage_key="text", unconditional=False,
                                  starts_with_bov=True, cond_token_num=PREFIX)
    return argparse.Namespace(**common, hybrid=False, cond_stage_key="label", unconditional=True,
                              starts_with_bov=False, cond_token_num=0)


def write_generator_ckpt(path: Path, kind: str, text_vocab: int = 0, with_tokenizer: bool = True,
                         **extra) -> dict[str, torch.Tensor]:
    """A Lightning-style .ckpt of a released generator; returns its transformer.* weights."""
    weights = released_generator_weights(kind, text_vocab)
    state = dict(weights)
    if with_tokenizer:
        state["first_stage_model.encoder_layers.0.conv.weight"] = torch.zeros(4, 3, 3, 3, 3)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000,
                "hyper_parameters": {"args": released_args(kind), "ckpt_path": None, **extra}}, path)
    return weights


def write_tokenizer_pt(path: Path, state: dict[str, torch.Tensor]) -> None:
    """The released tokenizer file layout: model_state_dict with DDP's 'module.' prefix, version, pickled config."""
    config = pickle.dumps({"image_size": 128, "embed_dim": 6, "fsq_levels": [8, 8, 8, 5, 5, 5], "use_fsq": True})
    torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}, "version": "1.0.0",
                "config": config}, path)


# ---- the authors' generator, as they describe it -------------------------------------------------------------
def official_sequence(kind: str, tokens: torch.Tensor, prefix: torch.Tensor | None, text_vocab: int) -> torch.Tensor:
    """Their input ids: UCF [text + L, BOV 0, z0..z(L-1), 1..L-1, zL...] + shifts, K600 z; minus the last block."""
    z = tokens.reshape(tokens.shape[0], -1)
    if kind == "k600":
        return z[:, :-BLOCK]
    b = z.shape[0]
    video = z + BLOCK + text_vocab
    middle = torch.arange(1, BLOCK).repeat(b, 1)
    seq = torch.cat([prefix + BLOCK, torch.zeros(b, 1, dtype=torch.long), video[:, :BLOCK], middle,
                     video[:, BLOCK:]], dim=1)
    return seq[:, :-BLOCK]


def official_mask(kind: str, seq_len: int, prefix_len: int) -> torch.Tensor:
    """Their boolean attention masks: K600 block-causal in blocks of L from position 0; UCF causal, the text
    prefix visible to all, then blocks of L from prefix + L (the last first-block token and the placeholders)."""
    if kind == "k600":
        mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        for i in range(0, seq_len, BLOCK):
            mask[i:i + BLOCK, : i + BLOCK] = True
        return mask
    mask = torch.ones(seq_len, seq_len).tril().bool()
    mask[:, :prefix_len] = True
    start = prefix_len + BLOCK
    for i in range(start, seq_len, BLOCK):
        mask[i:i + BLOCK, start:i + BLOCK] = True
    return mask


def official_logits(weights: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """minGPT's forward: token + position embeddings, pre-LayerNorm blocks (softmax attention written out),
    final LayerNorm, head without bias. Logits over the whole vocabulary, [B, S, rows]."""
    w = {k.removeprefix("transformer."): v.double() for k, v in weights.items()}
    s = ids.shape[1]
    x = w["tok_emb.weight"][ids] + w["pos_emb"][0, :s]
    layers = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    hd = D_MODEL // N_HEAD
    for i in range(layers):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (D_MODEL,), w[p + "ln1.weight"], w[p + "ln1.bias"], eps=1e-5)
        q, k, v = (F.linear(h, w[p + f"attn.{n}.weight"], w[p + f"attn.{n}.bias"])
                   .view(h.shape[0], s, N_HEAD, hd).transpose(1, 2) for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(h.shape[0], s, D_MODEL)
        x = x + F.linear(y, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = F.layer_norm(x, (D_MODEL,), w[p + "ln2.weight"], w[p + "ln2.bias"], eps=1e-5)
        h = F.linear(F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"])),
                     w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
        x = x + h
    x = F.layer_norm(x, (D_MODEL,), w["ln_f.weight"], w["ln_f.bias"], eps=1e-5)
    return x @ w["head.weight"].T

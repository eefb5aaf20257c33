"""Tiny prefix-tuning models of every family the prefix path covers (random weights, built from configs).

GQA where the family has it (4 query heads, 2 KV heads, head_dim 8), sliding windows of 4 where asked, Gemma2's
softcap, GPT-2's layer-scaled attention, OPT's pre-scaled queries, T5's relative bias. ``PEFT`` and ``patched``
models of one case come from the same seeds, so their parameters are equal.
"""

from __future__ import annotations

import torch

VOCAB, PAD = 128, 0
DECODERS = ("llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt_neox", "opt", "gpt2", "bloom")
ENCODERS = ("bert", "roberta")
FAMILIES = DECODERS + ("t5",) + ENCODERS


def config(family: str, attn: str = "eager", window: int | None = None, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "llama":
        cfg = tf.LlamaConfig(**llama_like)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**llama_like, use_sliding_window=window is not None, sliding_window=window or 4096,
                             max_window_layers=0)
    elif family == "mistral":
        cfg = tf.MistralConfig(**llama_like, sliding_window=window, head_dim=8)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**llama_like, head_dim=8)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**llama_like, head_dim=8, sliding_window=window or 4096, attn_logit_softcapping=5.0,
                              final_logit_softcapping=None, query_pre_attn_scalar=8)
    elif family == "phi3":
        cfg = tf.Phi3Config(**llama_like, sliding_window=window)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               max_position_embeddings=128, rotary_pct=0.5, **common)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0, **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True, **common)
    elif family == "bloom":
        cfg = tf.BloomConfig(hidden_size=32, n_layer=layers, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
                             **common)
    elif family == "t5":
        cfg = tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=layers, num_heads=4, dropout_rate=0.0,
                          decoder_start_token_id=PAD, eos_token_id=2, vocab_size=VOCAB, pad_token_id=PAD)
    elif family in ENCODERS:
        cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
        cfg = cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=3, vocab_size=VOCAB, pad_token_id=1 if family == "roberta" else PAD)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cfg._attn_implementation = attn
    return cfg


def base_model(family: str, seed: int = 0, task: str | None = None, **kw):
    import transformers as tf

    if family in DECODERS:
        cls = tf.AutoModelForCausalLM
    elif family == "t5":
        cls = tf.T5ForConditionalGeneration
    else:
        cls = {"SEQ_CLS": tf.AutoModelForSequenceClassification, "TOKEN_CLS": tf.AutoModelForTokenClassification,
               "QUESTION_ANS": tf.AutoModelForQuestionAnswering, "FEATURE_EXTRACTION": tf.AutoModel}[task or "SEQ_CLS"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = config(family, **kw)
        if task == "QUESTION_ANS":
            cfg.num_labels = 2  # start and end logits
        model = cls.from_config(cfg, attn_implementation=cfg._attn_implementation) if cls is not \
            tf.T5ForConditionalGeneration else cls(cfg)
    return model.eval()


def task_of(family: str) -> str:
    return "CAUSAL_LM" if family in DECODERS else "SEQ_2_SEQ_LM" if family == "t5" else "SEQ_CLS"


def _peft(base, cfg, seed: int):
    """get_peft_model with the prompt encoder's parameters drawn from ``seed + 1`` (random, not PEFT's init)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, cfg)
        for param in model.prompt_encoder.parameters():
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def prefix_model(family: str, p: int = 5, projection: bool = False, seed: int = 0, task: str | None = None, **kw):
    """A PeftModel with one prefix-tuning adapter, its encoder's weights random (seeded)."""
    from peft import PrefixTuningConfig

    task = task or task_of(family)
    base = base_model(family, seed, task=task, **kw)
    cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=p, prefix_projection=projection,
                             encoder_hidden_size=24)
    return _peft(base, cfg, seed)


def inputs(family: str, batch: int = 3, seq: int = 7, seed: int = 0, labels: bool = True, task: str | None = None):
    """Row 1 padded by 2 tokens and row 2 by 1 (left for decoders, right for encoders and T5's encoder)."""
    task = task or task_of(family)
    g = torch.Generator().manual_seed(seed)
    pad = 1 if family == "roberta" else PAD
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in ((1, 2), (2, 1)):
        if row < batch:
            sl = slice(0, n) if family in DECODERS else slice(seq - n, seq)
            ids[row, sl], mask[row, sl] = pad, 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
        if labels:
            out["labels"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    elif labels:
        if family in DECODERS:
            out["labels"] = ids.masked_fill(mask == 0, -100)
        elif task == "SEQ_CLS":
            out["labels"] = torch.randint(0, 3, (batch,), generator=g)
        elif task == "TOKEN_CLS":
            out["labels"] = torch.randint(0, 2, (batch, seq), generator=g)
        elif task == "QUESTION_ANS":
            out["start_positions"] = torch.randint(0, seq, (batch,), generator=g)
            out["end_positions"] = torch.randint(0, seq, (batch,), generator=g)
    return out


def prompt_model(family: str, kind: str = "prompt", p: int = 4, encoder: str = "MLP", seed: int = 0,
                 task: str | None = None, inference_mode: bool = False, **kw):
    """A PeftModel with one prompt-tuning (``kind="prompt"``) or P-tuning (``kind="ptuning"``, ``encoder`` MLP or
    LSTM) adapter; all prompt parameters random (seeded)."""
    from peft import PromptEncoderConfig, PromptTuningConfig

    task = task or task_of(family)
    base = base_model(family, seed, task=task, **kw)
    if kind == "prompt":
        cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=p, inference_mode=inference_mode)
    else:
        cfg = PromptEncoderConfig(task_type=task, num_virtual_tokens=p, encoder_reparameterization_type=encoder,
                                  encoder_hidden_size=16, inference_mode=inference_mode)
    return _peft(base, cfg, seed)


def patched_pair(build, *args, **kw):
    """(PEFT model, patched model) from the same seeds; the patch must say nothing (no fallback warning)."""
    import warnings

    import fastpeft

    ref, pat = build(*args, **kw), build(*args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.patch(pat)
    return ref, pat


def grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def generate_inputs(family: str) -> dict:
    """``inputs`` for ``generate``: the ids and their (padded) mask only."""
    x = inputs(family, labels=False)
    return {k: x[k] for k in ("input_ids", "attention_mask")}


def assert_same_generate(ref, pat, family: str, new: int = 6):
    """Greedy generate on a padded batch: the same tokens and scores; returns both outputs."""
    from fastpeft.testing import assert_close

    kw = dict(max_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_scores=True)
    x = generate_inputs(family)
    out_r, out_p = ref.generate(**x, **kw), pat.generate(**x, **kw)
    assert torch.equal(out_p.sequences, out_r.sequences)
    for s_p, s_r in zip(out_p.scores, out_r.scores):
        assert_close(s_p, s_r, name="scores")
    return out_r, out_p

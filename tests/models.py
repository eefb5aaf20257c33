"""Tiny ``from_config`` models of the seed families, their inputs, and LoRA-wrapped versions.

Plain functions with no pytest dependency, so benchmarks can import them too (``from tests.models import ...``
from the repository root, or ``from models import ...`` inside the tests folder). Every builder is a pure
function of its arguments and ``seed``: building twice gives bit-identical weights, which is what lets a test
save an adapter from one model and reload it onto a fresh base.

Families (small on purpose: hidden 32, 2 layers, vocab 128; the model's own dropouts are off so LoRA dropout is
the only randomness in training mode):
    llama  LlamaForCausalLM, RoPE, GQA (4 heads, 2 KV heads)          decoder-only, nn.Linear
    gpt2   GPT2LMHeadModel, Conv1D projections (LoRA fan_in_fan_out)   decoder-only
    bloom  BloomForCausalLM, ALiBi, fused query_key_value              decoder-only
    t5     T5ForConditionalGeneration                                   encoder-decoder
    bert   BertForSequenceClassification (3 labels)                     encoder
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["FAMILIES", "DECODER_ONLY", "VOCAB", "PAD", "base_config", "base_model", "model_inputs", "lora_config",
           "lora_model"]

FAMILIES = ("llama", "gpt2", "bloom", "t5", "bert")
DECODER_ONLY = ("llama", "gpt2", "bloom")
VOCAB, PAD = 128, 0
_TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bloom": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


def base_config(family: str, hidden: int = 32, layers: int = 2):
    """The transformers config of a tiny ``family`` model (eager attention for every family: deterministic and
    the same path with and without padding)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, initializer_range=0.1)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, **common)
    elif family == "bloom":
        cfg = tf.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=4, hidden_dropout=0.0,
                             attention_dropout=0.0, bos_token_id=1, eos_token_id=2, **common)
    elif family == "t5":
        cfg = tf.T5Config(d_model=hidden, d_ff=2 * hidden, d_kv=hidden // 4, num_layers=layers, num_heads=4,
                          dropout_rate=0.0, decoder_start_token_id=PAD, eos_token_id=2, initializer_factor=1.0,
                          vocab_size=VOCAB, pad_token_id=PAD)
    elif family == "bert":
        cfg = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_labels=3, **common)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cfg._attn_implementation = "eager"
    return cfg


def base_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny ``family`` model in eval mode; the same ``seed`` gives the same weights."""
    import transformers as tf

    cls = {"llama": tf.LlamaForCausalLM, "gpt2": tf.GPT2LMHeadModel, "bloom": tf.BloomForCausalLM,
           "t5": tf.T5ForConditionalGeneration, "bert": tf.BertForSequenceClassification}[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(base_config(family, **config_kwargs))
    return model.to(dtype).eval()


def model_inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 0, pad: int = 2, labels: bool = True,
                 device="cpu") -> dict:
    """Forward kwargs for ``family``. Row 0 of a decoder-only or BERT batch is left-padded by ``pad`` tokens
    (the layout ``generate`` needs); padded positions get label -100. T5 gets encoder padding and decoder labels
    (or ``decoder_input_ids`` when ``labels=False``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        ids[0, :pad] = PAD
        mask[0, :pad] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "t5" and not labels:  # without labels T5 needs decoder inputs (generate ignores these)
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(seq // 2, 2)), generator=g)
    if labels:
        if family in DECODER_ONLY:
            out["labels"] = ids.masked_fill(mask == 0, -100)
        elif family == "t5":
            out["labels"] = torch.randint(3, VOCAB, (batch, max(seq // 2, 2)), generator=g)
        else:
            out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    return {k: v.to(device) for k, v in out.items()}


def lora_config(family: str, **lora_kwargs):
    """LoraConfig on every linear layer of ``family``, non-zero B (``init_lora_weights=False``) by default.

    "all-linear" covers nn.Linear and GPT-2's Conv1D and excludes the output head; BERT's classifier becomes a
    ``modules_to_save`` copy through the SEQ_CLS task type.
    """
    from peft import LoraConfig

    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
              task_type=_TASK[family])
    if family == "gpt2":
        kw["fan_in_fan_out"] = True  # Conv1D stores W as [in, out]; PEFT would force it with a warning
    kw.update(lora_kwargs)
    return LoraConfig(**kw)


def lora_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, adapter_seed: int | None = None,
               adapter_name: str = "default", base=None, **lora_kwargs):
    """A PeftModel: the ``base_model(family, seed, dtype)`` (or ``base``) with one LoRA adapter.

    The adapter weights are a function of ``adapter_seed`` (default: ``seed + 1``). For a bf16/fp16 ``dtype``
    the base is cast before wrapping, so PEFT upcasts the adapters to fp32 as it does by default.
    """
    from peft import get_peft_model

    model = base_model(family, seed, dtype) if base is None else base
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed + 1 if adapter_seed is None else adapter_seed)
        pm = get_peft_model(model, lora_config(family, **lora_kwargs), adapter_name=adapter_name)
    return pm.eval()

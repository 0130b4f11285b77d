"""Configuration of a mod-train model (Mixture-of-Depths, MoE, MoDE) exported for Hugging Face ``transformers``.

Shipped inside every exported directory that the stock classes cannot represent and registered
through ``auto_map``, so ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` finds it offline.
Self-contained: imports only ``transformers``.

``layers`` holds one entry per transformer layer (0-based order)::

    {"mod": null | {"capacity": 0.125, "router_weight": "sigmoid" | "logit" | "none",
                    "causal": "aux_loss" | "predictor", "predictor_hidden": 8},
     "moe": null | {"num_experts": 4, "top_k": 2, "pre_softmax": false, "ffn_hidden_size": 96,
                    "shared_ffn_hidden_size": null, "num_noop_experts": 0}}
"""

from transformers import PretrainedConfig


class ModTrainConfig(PretrainedConfig):
    model_type = "mod_train"

    def __init__(self, vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=None, head_dim=None, intermediate_size=192, normalization="RMSNorm",
                 norm_eps=1e-5, activation="swiglu", position_embedding="rope", rope_theta=10000.0,
                 max_position_embeddings=64, tie_word_embeddings=False, layers=None, real_vocab_size=None,
                 use_cache=True, **kwargs):
        self.use_cache = use_cache
        self.vocab_size = vocab_size  # rows of the (padded) embedding table
        self.real_vocab_size = real_vocab_size or vocab_size  # the tokenizer's vocabulary
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.activation = activation
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.layers = layers if layers is not None else [{"mod": None, "moe": None}] * num_hidden_layers
        if len(self.layers) != num_hidden_layers:
            raise ValueError(f"layers has {len(self.layers)} entries for num_hidden_layers={num_hidden_layers}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

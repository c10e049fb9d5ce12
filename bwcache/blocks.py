"""Where a transformer keeps its DiT blocks, and what each block class takes and returns.

Model knowledge lives here as data: diffusers' `TransformerBlockRegistry` describes most block classes; the table
below adds the ones it does not know, and the layouts say in which order a forward runs the block lists. A
`BlockSpec` reads a block call's inputs and outputs by that description, and packs a reused output the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.utils.torch_utils import unwrap_module

# Attributes that hold DiT blocks as an `nn.ModuleList`, as diffusers' own caches look for them.
BLOCK_LIST_NAMES = (
    "transformer_blocks",
    "single_transformer_blocks",
    "temporal_transformer_blocks",
    "blocks",
    "layers",
    "visual_transformer_blocks",
)

# Transformers whose forward alternates between two block lists (block i of each, in turn).
INTERLEAVED_LAYOUTS = {
    "LatteTransformer3DModel": ("transformer_blocks", "temporal_transformer_blocks"),
}

# Block classes the diffusers registry does not describe: (module, class) -> metadata arguments.
EXTRA_BLOCK_METADATA = {
    ("diffusers.models.transformers.transformer_skyreels_v2", "SkyReelsV2TransformerBlock"): dict(
        return_hidden_states_index=0, return_encoder_hidden_states_index=None
    ),
    ("diffusers.models.transformers.transformer_allegro", "AllegroTransformerBlock"): dict(
        return_hidden_states_index=0, return_encoder_hidden_states_index=None
    ),
}

# Where a block's AdaLN-modulated input lives (`indicator_feature="modulated"`): the submodule whose input is
# `norm1(x)·(1 + scale_msa) + shift_msa` (its `hidden_states` argument, or first positional one), and for block
# classes shared by models with and without AdaLN, the attribute values under which it is modulated.
MODULATED_INPUTS = {
    ("diffusers.models.transformers.transformer_wan", "WanTransformerBlock"): ("attn1", None),
    ("diffusers.models.transformers.transformer_skyreels_v2", "SkyReelsV2TransformerBlock"): ("attn1", None),
    ("diffusers.models.transformers.cogvideox_transformer_3d", "CogVideoXBlock"): ("attn1", None),
    ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoTransformerBlock"): ("attn", None),
    ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoSingleTransformerBlock"): ("attn", None),
    # HunyuanVideo-I2V's (image_condition_type "token_replace"): the first frame's tokens modulated at timestep 0.
    ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoTokenReplaceTransformerBlock"): (
        "attn", None
    ),
    ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoTokenReplaceSingleTransformerBlock"): (
        "attn", None
    ),
    ("diffusers.models.transformers.transformer_ltx", "LTXVideoTransformerBlock"): ("attn1", None),
    ("diffusers.models.transformers.transformer_mochi", "MochiTransformerBlock"): ("attn1", None),
    ("diffusers.models.transformers.transformer_allegro", "AllegroTransformerBlock"): ("attn1", None),
    # Latte's spatial and temporal blocks (norm_type="ada_norm_single").
    ("diffusers.models.attention", "BasicTransformerBlock"): (
        "attn1", ("norm_type", ("ada_norm_single", "ada_norm_zero", "ada_norm", "ada_norm_continuous"))
    ),
}

_user_metadata: dict[type, TransformerBlockMetadata] = {}


def register_block(
    block_class: type,
    return_hidden_states_index: int = 0,
    return_encoder_hidden_states_index: int | None = None,
    hidden_states_argument_name: str = "hidden_states",
    encoder_hidden_states_argument_name: str = "encoder_hidden_states",
) -> None:
    """Describe a block class BWCache does not know yet: where its outputs are and how its inputs are named.

    `return_*_index` are positions in the block's returned tuple (`0` with `None` for encoder hidden states means
    the block returns a single tensor).
    """
    metadata = TransformerBlockMetadata(
        return_hidden_states_index=return_hidden_states_index,
        return_encoder_hidden_states_index=return_encoder_hidden_states_index,
        hidden_states_argument_name=hidden_states_argument_name,
        encoder_hidden_states_argument_name=encoder_hidden_states_argument_name,
    )
    metadata._cls = block_class
    _user_metadata[block_class] = metadata


def block_metadata(block_class: type) -> TransformerBlockMetadata | None:
    """The metadata of a block class, or `None` when nothing describes it."""
    if block_class in _user_metadata:
        return _user_metadata[block_class]
    try:
        return TransformerBlockRegistry.get(block_class)
    except ValueError:
        pass
    arguments = EXTRA_BLOCK_METADATA.get((block_class.__module__, block_class.__name__))
    if arguments is None:
        return None
    register_block(block_class, **arguments)
    return _user_metadata[block_class]


@dataclass
class BlockSpec:
    """One DiT block as the cache sees it."""

    index: int
    name: str
    module: torch.nn.Module
    metadata: TransformerBlockMetadata

    @property
    def has_encoder_stream(self) -> bool:
        """Whether the block also returns encoder hidden states (dual-stream blocks)."""
        return self.metadata.return_encoder_hidden_states_index is not None

    def inputs(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states a call of the block is given, and its encoder hidden states (dual-stream blocks)."""
        metadata = self.metadata
        hidden_states = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
        encoder_hidden_states = None
        if self.has_encoder_stream:
            try:
                encoder_hidden_states = metadata._get_parameter_from_args_kwargs(
                    metadata.encoder_hidden_states_argument_name, args, kwargs
                )
            except ValueError:
                encoder_hidden_states = None
        return hidden_states, encoder_hidden_states

    def outputs(self, output) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states and encoder hidden states (or `None`) in what the block returned."""
        if not isinstance(output, (tuple, list)):
            return output, None
        metadata = self.metadata
        encoder_hidden_states = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder_hidden_states = output[metadata.return_encoder_hidden_states_index]
        return output[metadata.return_hidden_states_index], encoder_hidden_states

    def pack(self, arity: int | None, hidden_states, encoder_hidden_states):
        """An output of the structure the block itself returns: a tensor (`arity` None) or a tuple of `arity`."""
        if arity is None:
            return hidden_states
        output = [None] * arity
        output[self.metadata.return_hidden_states_index] = hidden_states
        if self.metadata.return_encoder_hidden_states_index is not None:
            output[self.metadata.return_encoder_hidden_states_index] = encoder_hidden_states
        return tuple(output)


def find_blocks(transformer: torch.nn.Module) -> list[BlockSpec]:
    """The transformer's DiT blocks in the order its forward runs them.

    Raises a `ValueError` naming the transformer class when it has no recognisable block list, or naming the block
    class when a block is of a class nothing describes.
    """
    model = unwrap_module(transformer)
    model_name = type(model).__name__
    lists = {
        name: child
        for name, child in model.named_children()
        if name in BLOCK_LIST_NAMES and isinstance(child, torch.nn.ModuleList) and len(child) > 0
    }
    if not lists:
        raise ValueError(
            f"BWCache does not support {model_name}: it has no DiT block list (an nn.ModuleList named one of "
            f"{', '.join(BLOCK_LIST_NAMES)})."
        )
    interleaved = INTERLEAVED_LAYOUTS.get(model_name)
    if interleaved and all(name in lists for name in interleaved):
        depth = max(len(lists[name]) for name in interleaved)
        order = [(name, i) for i in range(depth) for name in interleaved if i < len(lists[name])]
        order += [(name, i) for name in lists if name not in interleaved for i in range(len(lists[name]))]
    else:
        order = [(name, i) for name in lists for i in range(len(lists[name]))]

    specs = []
    for index, (list_name, i) in enumerate(order):
        block = lists[list_name][i]
        block_class = type(unwrap_module(block))
        metadata = block_metadata(block_class)
        if metadata is None:
            raise ValueError(
                f"BWCache does not support {model_name}: its block class {block_class.__name__} "
                f"({block_class.__module__}) is not described. Describe it with "
                "bwcache.register_block(block_class, return_hidden_states_index=..., "
                "return_encoder_hidden_states_index=...)."
            )
        specs.append(BlockSpec(index=index, name=f"{list_name}.{i}", module=block, metadata=metadata))
    return specs



def modulated_input(spec: BlockSpec) -> torch.nn.Module:
    """The submodule of a block whose input is the block's AdaLN-modulated hidden states.

    Raises a `ValueError` naming the block class where that is not known (or the block has no AdaLN).
    """
    block = unwrap_module(spec.module)
    block_class = type(block)
    known = MODULATED_INPUTS.get((block_class.__module__, block_class.__name__))
    if known is not None:
        name, condition = known
        if condition is None or getattr(block, condition[0], None) in condition[1]:
            submodule = getattr(block, name, None)
            if isinstance(submodule, torch.nn.Module):
                return submodule
    raise ValueError(
        f"indicator_feature='modulated' needs to know where {block_class.__name__} ({block_class.__module__}, "
        f"block {spec.name}) modulates its attention input, and BWCache does not (known: "
        + ", ".join(sorted({cls for _, cls in MODULATED_INPUTS}))
        + "). Use indicator_feature='hidden_states'."
    )

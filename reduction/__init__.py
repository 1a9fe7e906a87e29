"""tokenreduce.reduction: pure-JAX token merging and pruning, importable into any JAX model.

No Flax import here: every op takes and returns arrays (or the small pytrees ``TokenState`` and
``ReductionStep``), with counts as static Python ints.

Eager calls: the public ops (and ``reducer(state, info)``) called outside a ``jax.jit`` run one compiled program per
static configuration and shape (``reduction._compiled.eager_jit``); under a user's jit they are traced as is.
"""

from reduction.attention import combine_biases, key_mask_bias, proportional_attention_bias
from reduction.flops import (
    attention_flops,
    block_flops,
    mlp_flops,
    transformer_flops,
    vit_flops,
)
from reduction.pitome import PiToMe, margin_schedule, pitome_energy, pitome_matching, pitome_merge, pitome_r
from reduction.reducers import (
    ATTENTION,
    HIDDEN,
    KEYS,
    LAYER_ATTENTION,
    METRIC,
    POINTS,
    TEXT_ATTENTION,
    LayerInfo,
    Reducer,
    SpecError,
    ToMe,
    available_methods,
    build_layer_reducers,
    check_spec,
    describe_methods,
    default_layers,
    method_options,
    register,
    tokens_per_layer,
)
from reduction.spans import span_keep_indices
from reduction.schedule import (
    constant_ratio_tokens,
    keep_count,
    ratio_to_r,
    tome_clamp,
    tome_r_schedule,
    tome_tokens_per_layer,
)
from reduction.state import TokenState, init_state, source_matrix, unmerge
from reduction.step import (
    ReductionStep,
    apply_step,
    apply_to_tokens,
    compose_steps,
    identity_step,
    merge_step,
    prune_step,
)
from reduction.tome import (bipartite_soft_matching, cosine_normalize, kth_bipartite_soft_matching, merged_tokens,
                            random_bipartite_soft_matching, tome_merge)

from reduction.dart import (  # noqa: E402  (pruning methods register themselves on import)
    Dart,
    cpython_set_order,
    dart_keep_indices,
    dart_kept_per_image,
    dart_keeps_all,
    dart_vit_keep_indices,
)
from reduction.zerotprune import ZeroTPrune, ZeroTPruneConfig, eir_vhf, wpr_per_head, zerotprune, zerotprune_step  # noqa: E402
from reduction.baselines import (  # noqa: E402
    FastV,
    fastv_keep_indices,
    pool_step,
    pool_tokens,
    random_keep_indices,
    topk_keep_indices,
)
from reduction.divprune import DivPrune, divprune_keep_indices, divprune_select  # noqa: E402
from reduction.visionzip import VisionZip, visionzip_step  # noqa: E402
from reduction.cdpruner import CDPruner, cdpruner_keep_indices, dpp_select  # noqa: E402
from reduction.script import Script, script_select  # noqa: E402
from reduction.kmeans_merge import KMeansMerge, kmeans_step  # noqa: E402
from reduction.tokencorr import TokenCorr, tokencorr_keep  # noqa: E402
from reduction.vispruner import VisPruner, vispruner_keep_indices  # noqa: E402
from reduction.pyramiddrop import PyramidDrop, pyramiddrop_official_counts  # noqa: E402
from reduction.sparsevlm import SparseVLM, dpc_knn, sparsevlm_counts, sparsevlm_rank_step, sparsevlm_step  # noqa: E402
from reduction.todre import ToDRELLM, todre_scores  # noqa: E402
from reduction.globalcom2 import GlobalCom2, globalcom2_keep  # noqa: E402
from reduction.hot import HoTPrune, dpc_knn_scores, hot_prune_step, sincos_2d  # noqa: E402
from reduction.delete_gate import DeleteGate  # noqa: E402
from reduction.atp import (  # noqa: E402
    budget_loss,
    compact_keep,
    hard_keep_mask,
    received_attention,
    redundancy_score,
    soft_keep_mask,
    spatial_grid_mask,
)

__all__ = [name for name in dir() if not name.startswith("_")]

"""The pt2e flow (no Lightning), one module a job, gathered here as the namespace the callbacks and export use.

Built on torchao 0.18's pt2e flow with the x86 inductor quantizer: ``torch.export.export(strict=True)`` ->
``prepare_qat_pt2e`` / ``prepare_pt2e`` -> ``convert_pt2e`` -> ``torch.export.save`` (``.pt2``) and, for speed,
``torch.compile`` with inductor freezing, which lowers the quantize/dequantize patterns to oneDNN int8 kernels.

- `_spec`: what to quantize and how (``QuantSpec``), module paths and skip patterns;
- `_capture`: ``torch.export`` capture with a failure that names the layer;
- `_graph`: prepare (torchao's quantizers), train/eval modes, QAT phases, dropout removal;
- `_convert`: conversion, its rehearsal, ``.pt2`` artifacts, compiled inference;
- `_diagnostics`: per-layer ranges, scales and SQNR;
- `_torchao`: the workarounds of torchao's internals, behind a version check.
"""

from __future__ import annotations

from lightning_opt.quantization._capture import (  # noqa: F401
    _as_batch,
    _dynamic_shapes,
    _export,
    _first_line,
    _locate_export_failure,
    _no_kv_cache,
    capture,
    export_for_quantization,
)
from lightning_opt.quantization._convert import (  # noqa: F401
    CompiledInference,
    _BadNodeFinder,
    _check_output,
    _find_bad_node,
    _Found,
    _refuse,
    convert,
    drop_unused_tensors,
    export_artifact,
    load_artifact,
    observe,
    rehearse,
    save_artifact,
    unobserved,
)
from lightning_opt.quantization._diagnostics import (  # noqa: F401
    _qparams,
    _quantizer_feeding,
    _Recorder,
    layer_quant_params,
    layer_sqnr,
    quant_ranges,
    sqnr_db,
)
from lightning_opt.quantization._graph import (  # noqa: F401
    _apply_mode,
    _check_skipped,
    _fake_quant_modules,
    _node_layer_name,
    _set_sdpa_dropout,
    _users_through_dequant,
    build_quantizer,
    install_train_eval,
    is_prepared,
    prepare,
    quantized_weight_layers,
    set_graph_mode,
    set_phase,
    set_quant_state,
    spec_of,
    state_of,
    strip_dropout,
    sync_mode,
)
from lightning_opt.quantization._spec import (  # noqa: F401
    _BN_TARGETS,
    _COMPUTE_TARGETS,
    _DROPOUT_P_KEY,
    _DROPOUT_TARGETS,
    _META_KEY,
    _NATIVE_DROPOUT,
    _SDPA,
    SUPPORTED_ACTIVATION_SCHEMES,
    SUPPORTED_DTYPES,
    SUPPORTED_WEIGHT_SCHEMES,
    QuantizationExportError,
    QuantSpec,
    default_module_path,
    get_submodule,
    resolve_skip_patterns,
    set_submodule,
    validate_scheme,
)

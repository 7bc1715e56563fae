"""Reference run for the converter tests, executed as a SUBPROCESS that never imports qconv.

Reads a JSON list of cases from argv[1]; for each case it
1. quantizes the source on load with transformers + bitsandbytes (CPU) and ``save_pretrained``s it to
   ``case["ref_dir"]`` (the byte reference),
2. loads qconv's output with plain ``AutoModelForCausalLM.from_pretrained(out)``,
3. compares the logits of both models on fixed token ids,
and prints one JSON line per case. transformers' ``BitsAndBytesConfig`` has no blocksize option; for a
non-default blocksize the reference sets the ``blocksize`` attribute of each new ``Params4bit`` (the
value transformers passes through to ``quantize_4bit``). bitsandbytes' repacked CPU inference kernel
(AVX512-BF16 machines) is switched off in both models: it asserts ``out_features % 32 == 0``, which the
tiny test shapes are not.
"""

import json
import sys


def main(cases_path: str) -> None:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cases = json.load(open(cases_path))
    original_init = bnb.nn.Linear4bit.__init__
    ids = torch.tensor([[1, 5, 17, 42, 99, 200, 300, 7, 3, 250]])
    for case in cases:
        s = case["settings"]
        dtype = getattr(torch, s["compute_dtype"])

        def init(self, *args, _blocksize=s["blocksize"], **kwargs):
            original_init(self, *args, **kwargs)
            self.weight.blocksize = _blocksize

        bnb.nn.Linear4bit.__init__ = init
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=s["quant_type"],
            bnb_4bit_use_double_quant=s["double_quant"],
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=getattr(torch, s["quant_storage"]),
            llm_int8_skip_modules=list(s["skip_modules"]) or None,
        )
        ref = AutoModelForCausalLM.from_pretrained(case["src"], quantization_config=config, device_map="cpu", dtype=dtype)
        ref.save_pretrained(case["ref_dir"])
        bnb.nn.Linear4bit.__init__ = original_init
        ours = AutoModelForCausalLM.from_pretrained(case["out"], device_map="cpu")
        for model in (ref, ours):  # bnb's repacked AVX512-BF16 CPU kernel asserts out_features % 32 == 0
            for module in model.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            a = ref(ids).logits.float()
            b = ours(ids).logits.float()
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in ours.modules())
        print(json.dumps({
            "name": case["name"],
            "equal": bool(torch.equal(a, b)),
            "max_abs_diff": float((a - b).abs().max()),
            "finite": bool(torch.isfinite(b).all()),
            "linear4bit": n4,
            "ours_dtype": str(ours.dtype),
            "qconv_imported": "qconv" in sys.modules,
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

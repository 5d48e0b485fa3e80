#!/usr/bin/env bash
# Caption a dataset in batches with reid-prompt: the same steps, in the same order, as
# scripts/batch_generate_captions.cmd (Windows). Run it from the folder that holds your data and outputs;
# every path below is relative to the current folder:
#
#     bash path/to/scripts/batch_generate_captions.sh
#
# Variables it reads (all optional):
#   DATA_ROOT         image folder, indexed when INDEX_FILE is missing   (default ./data/market1501)
#   INDEX_FILE        the index; `prepare` writes it when it is missing  (default outputs/runs/index_batch.json)
#   OUTPUT_DIR        the output folder                                   (default outputs/captions/batch)
#   PROMPT_FILE       a prompt file, or a bundled prompt's name           (default base)
#   REID_PROMPT_ARGS  extra options for `run`, split on spaces, e.g. "--model qwen-vl-plus --concurrency 8"
#   PYTHON            the Python to use                                   (default python3, else python)
# The API key: OPENAI_API_KEY (or your provider's key variable), or a .env file in the current folder
# (scripts/setup_api_and_run.sh writes one). The key is never printed.
# Exit code: the run's (0 done, 1 some failed, 2 bad input, 3 the server stopped the run, 4 budget,
# 130 interrupted); 2 when a check below fails before anything is sent.

set -u

DATA_ROOT="${DATA_ROOT:-./data/market1501}"
INDEX_FILE="${INDEX_FILE:-outputs/runs/index_batch.json}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/captions/batch}"
PROMPT_FILE="${PROMPT_FILE:-base}"
REID_PROMPT_ARGS="${REID_PROMPT_ARGS:-}"
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

finish() {
    # Keep a window opened for this script readable; never wait when the input is not a terminal.
    if [ -t 0 ]; then
        read -r -p "Press Enter to close " _ || true
    fi
    exit "$1"
}

# UTF-8 output (what `chcp 65001` does for the Windows console).
export PYTHONIOENCODING=utf-8

# Started from inside scripts/ itself (as a double-click does) with the data one folder up: work there.
if [ "$PWD" = "$script_dir" ] && [ ! -e "$DATA_ROOT" ] && [ -e "$script_dir/../$DATA_ROOT" ]; then
    cd "$script_dir/.." || finish 2
    echo "working in $PWD (the folder above the script's own)"
fi

# Python 3.10 or newer.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    command -v python3 >/dev/null 2>&1 || PYTHON=python
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: Python was not found ($PYTHON): install Python 3.10 or newer, or set PYTHON to its path" >&2
    finish 2
fi
"$PYTHON" -c "import sys; v = sys.version_info; sys.exit(None if v >= (3, 10) else 'error: reid-prompt needs Python 3.10 or newer; ' + sys.executable + ' is ' + sys.version.split()[0])" || finish 2

# The reid-prompt package: installed, or else the checkout this script lives in.
if ! "$PYTHON" -c "import pipeline.cli" >/dev/null 2>&1; then
    if [ -f "$script_dir/../pipeline/__init__.py" ]; then
        export PYTHONPATH="$(cd "$script_dir/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! "$PYTHON" -c "import pipeline.cli" >/dev/null 2>&1; then
        echo "error: reid-prompt is not installed for $PYTHON: in the reid-prompt folder run  $PYTHON -m pip install ." >&2
        finish 2
    fi
fi

# The API key (not needed for --backend offline or a local vllm/ollama/lmstudio server).
have_key=""
for name in OPENAI_API_KEY DASHSCOPE_API_KEY GEMINI_API_KEY OPENROUTER_API_KEY AZURE_OPENAI_API_KEY; do
    [ -n "${!name:-}" ] && have_key=1
done
if [ -z "$have_key" ] && [ -f .env ] \
    && grep -Eq '^[[:space:]]*(export[[:space:]]+)?[A-Z_]*API_KEY[[:space:]]*=[[:space:]]*[^[:space:]#]' .env; then
    have_key=1
fi
case " $REID_PROMPT_ARGS " in
    *offline*|*vllm*|*ollama*|*lmstudio*) have_key=1 ;;
esac
if [ -z "$have_key" ]; then
    echo "error: no API key: set OPENAI_API_KEY (or your provider's, e.g. DASHSCOPE_API_KEY), put it in .env in this folder, or run scripts/setup_api_and_run.sh" >&2
    finish 2
fi

# Batch size: Enter accepts 20; anything but a positive whole number is asked again.
while :; do
    printf 'Batch size [20]: '
    batch_size=""
    read -r batch_size
    [ -t 0 ] || echo  # typed answers are echoed by the terminal; piped ones are not
    batch_size="${batch_size:-20}"
    if [[ "$batch_size" =~ ^[1-9][0-9]*$ ]]; then
        break
    fi
    echo "please type a positive whole number (e.g. 20), or press Enter for 20"
done

# The index: prepared from DATA_ROOT when missing, reused when present.
if [ ! -f "$INDEX_FILE" ]; then
    echo "preparing the index $INDEX_FILE from $DATA_ROOT"
    "$PYTHON" -m pipeline prepare --root "$DATA_ROOT" --out "$INDEX_FILE" || finish $?
else
    echo "using the index $INDEX_FILE (delete it to prepare it again)"
fi

# Run.
read -r -a extra_args <<< "$REID_PROMPT_ARGS"
"$PYTHON" -m pipeline run --index "$INDEX_FILE" --out "$OUTPUT_DIR" --prompt-file "$PROMPT_FILE" \
    --batch-size "$batch_size" ${extra_args[@]+"${extra_args[@]}"}
rc=$?

# The files written.
if [ -d "$OUTPUT_DIR" ]; then
    echo "Files in $OUTPUT_DIR:"
    for f in "$OUTPUT_DIR"/*; do
        [ -f "$f" ] && printf '  %s  (%s bytes)\n' "${f##*/}" "$(wc -c < "$f" | tr -d ' ')"
    done
fi

finish "$rc"

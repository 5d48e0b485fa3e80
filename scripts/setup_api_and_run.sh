#!/usr/bin/env bash
# Set the API key (and, optionally, an OpenAI-compatible server), offer to keep them in .env in the
# current folder, then caption with scripts/batch_generate_captions.sh. The same steps, in the same order,
# as scripts/setup_api_and_run.cmd (Windows). Run it from the folder that holds your data and outputs:
#
#     bash path/to/scripts/setup_api_and_run.sh
#
# The key is read without echoing it and is never printed. The variables batch_generate_captions.sh reads
# (DATA_ROOT, INDEX_FILE, OUTPUT_DIR, PROMPT_FILE, REID_PROMPT_ARGS, PYTHON) apply here too.
# Exit code: the batch script's (the run's); 2 when no key is given and none is set.

set -u
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

finish() {
    if [ -t 0 ]; then
        read -r -p "Press Enter to close " _ || true
    fi
    exit "$1"
}

# UTF-8 output (what `chcp 65001` does for the Windows console).
export PYTHONIOENCODING=utf-8

# Replace (or add) one NAME=value line of .env, keeping the others; the file is readable by its owner only.
set_env_line() {
    local name="$1" value="$2" tmp=".env.tmp.$$"
    (
        umask 077
        {
            [ -f .env ] && grep -Ev "^[[:space:]]*(export[[:space:]]+)?$name[[:space:]]*=" .env
            printf '%s=%s\n' "$name" "$value"
        } > "$tmp"
    ) && mv -f "$tmp" .env
}

# The key, read without echo.
printf 'API key (input hidden; Enter keeps the key already set): '
key=""
read -r -s key
echo
existing=""
for name in OPENAI_API_KEY DASHSCOPE_API_KEY GEMINI_API_KEY OPENROUTER_API_KEY AZURE_OPENAI_API_KEY; do
    [ -n "${!name:-}" ] && existing=1
done
[ -f .env ] && grep -Eq '^[[:space:]]*(export[[:space:]]+)?[A-Z_]*API_KEY[[:space:]]*=[[:space:]]*[^[:space:]#]' .env && existing=1
if [ -z "$key" ] && [ -z "$existing" ]; then
    echo "error: no API key given, and none is set (OPENAI_API_KEY, your provider's key variable, or .env)" >&2
    finish 2
fi
[ -n "$key" ] && export OPENAI_API_KEY="$key"

# Optionally another OpenAI-compatible server, and its model.
printf 'Base URL of an OpenAI-compatible server (Enter for OpenAI; DashScope: https://dashscope-intl.aliyuncs.com/compatible-mode/v1): '
base_url=""
read -r base_url
[ -t 0 ] || echo
if [ -n "$base_url" ]; then
    export OPENAI_BASE_URL="$base_url"
    printf "Model on that server (Enter for reid-prompt's default; e.g. qwen-vl-plus): "
    model=""
    read -r model
    [ -t 0 ] || echo
    if [ -n "$model" ]; then
        export REID_PROMPT_ARGS="--model $model${REID_PROMPT_ARGS:+ $REID_PROMPT_ARGS}"
        echo "next time, set REID_PROMPT_ARGS=\"--model $model\" to use it again"
    fi
fi

# Offer to keep what was typed in .env (the key itself is never shown).
if [ -n "$key" ] || [ -n "$base_url" ]; then
    printf 'Save it in .env in this folder? [Y/n]: '
    answer=""
    read -r answer
    [ -t 0 ] || echo
    case "$answer" in
        ""|[Yy]|[Yy][Ee][Ss])
            [ -n "$key" ] && { set_env_line OPENAI_API_KEY "$key" || finish 2; }
            [ -n "$base_url" ] && { set_env_line OPENAI_BASE_URL "$base_url" || finish 2; }
            echo "saved in $PWD/.env (keep it out of version control)"
            ;;
        *) echo "not saved" ;;
    esac
fi

# Caption: the batch script asks for the batch size, runs, lists the files and passes its exit code on.
bash "$script_dir/batch_generate_captions.sh"
exit $?

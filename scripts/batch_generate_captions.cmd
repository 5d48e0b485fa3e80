@echo off
rem Caption a dataset in batches with reid-prompt: the same steps, in the same order, as
rem scripts/batch_generate_captions.sh. Double-click it, or run it from the folder that holds your data and
rem outputs; every path below is relative to the current folder.
rem
rem Variables it reads (all optional; e.g.  set DATA_ROOT=D:\datasets\Market-1501-v15.09.15):
rem   DATA_ROOT         image folder, indexed when INDEX_FILE is missing   (default ./data/market1501)
rem   INDEX_FILE        the index; prepare writes it when it is missing    (default outputs/runs/index_batch.json)
rem   OUTPUT_DIR        the output folder                                   (default outputs/captions/batch)
rem   PROMPT_FILE       a prompt file, or a bundled prompt's name           (default base)
rem   REID_PROMPT_ARGS  extra options for run, e.g.  set REID_PROMPT_ARGS=--model qwen-vl-plus --concurrency 8
rem   PYTHON            the Python to use (default python, else the py launcher); quote a path with spaces
rem   REID_PROMPT_NO_PAUSE  set it to skip the pause at the end (scheduled tasks, other scripts)
rem The API key: OPENAI_API_KEY (or your provider's key variable), or a .env file in the current folder
rem (scripts\setup_api_and_run.cmd writes one). The key is never printed.
rem Exit code: the run's (0 done, 1 some failed, 2 bad input, 3 the server stopped the run, 4 budget,
rem 130 interrupted); 2 when a check below fails before anything is sent.

setlocal EnableExtensions DisableDelayedExpansion
if not defined DATA_ROOT set "DATA_ROOT=./data/market1501"
if not defined INDEX_FILE set "INDEX_FILE=outputs/runs/index_batch.json"
if not defined OUTPUT_DIR set "OUTPUT_DIR=outputs/captions/batch"
if not defined PROMPT_FILE set "PROMPT_FILE=base"
set "RC=0"

rem UTF-8 output: the console's code page (the old one is restored at the end) and Python's streams.
for /f "tokens=2 delims=:." %%C in ('chcp') do set "OLD_CP=%%C"
chcp 65001 >nul
set "PYTHONIOENCODING=utf-8"

rem cmd's own checks get backslashes; Python gets the paths as they were set.
set "DATA_ROOT_W=%DATA_ROOT:/=\%"
set "INDEX_FILE_W=%INDEX_FILE:/=\%"
set "OUTPUT_DIR_W=%OUTPUT_DIR:/=\%"

rem Started from inside scripts\ itself (as a double-click does) with the data one folder up: work there.
if /i not "%CD%\"=="%~dp0" goto :python
if exist "%DATA_ROOT_W%" goto :python
if not exist "%~dp0..\%DATA_ROOT_W%" goto :python
cd /d "%~dp0.."
echo working in %CD% (the folder above the script's own)

:python
rem Python 3.10 or newer.
if defined PYTHON goto :python_version
set "PYTHON=python"
python -c "import sys" >nul 2>nul && goto :python_version
set "PYTHON=py -3"
py -3 -c "import sys" >nul 2>nul && goto :python_version
>&2 echo error: Python was not found: install Python 3.10 or newer from https://www.python.org/downloads/ (tick "Add python.exe to PATH"), then open a new window
set "RC=2"
goto :finish
:python_version
%PYTHON% -c "import sys; v = sys.version_info; sys.exit(None if v >= (3, 10) else 'error: reid-prompt needs Python 3.10 or newer; ' + sys.executable + ' is ' + sys.version.split()[0])"
if errorlevel 1 goto :fail

rem The reid-prompt package: installed, or else the checkout this script lives in.
%PYTHON% -c "import pipeline.cli" >nul 2>nul && goto :key
if not exist "%~dp0..\pipeline\__init__.py" goto :no_package
if defined PYTHONPATH set "PYTHONPATH=%~dp0..;%PYTHONPATH%"
if not defined PYTHONPATH set "PYTHONPATH=%~dp0.."
%PYTHON% -c "import pipeline.cli" >nul 2>nul && goto :key
:no_package
>&2 echo error: reid-prompt is not installed for %PYTHON%: in the reid-prompt folder run  %PYTHON% -m pip install .
goto :fail

:key
rem The API key (not needed for --backend offline or a local vllm/ollama/lmstudio server).
if defined OPENAI_API_KEY goto :batch_size
if defined DASHSCOPE_API_KEY goto :batch_size
if defined GEMINI_API_KEY goto :batch_size
if defined OPENROUTER_API_KEY goto :batch_size
if defined AZURE_OPENAI_API_KEY goto :batch_size
if not exist ".env" goto :keyless
findstr /r /i /c:"^[A-Z_ ]*API_KEY *= *[^ #]" ".env" >nul 2>nul && goto :batch_size
:keyless
set "XARGS=.%REID_PROMPT_ARGS%"
setlocal EnableDelayedExpansion
set "KEYLESS="
for %%W in (offline vllm ollama lmstudio) do if not "!XARGS:%%W=!"=="!XARGS!" set "KEYLESS=1"
endlocal & set "KEYLESS=%KEYLESS%"
if defined KEYLESS goto :batch_size
>&2 echo error: no API key: set OPENAI_API_KEY (or your provider's, e.g. DASHSCOPE_API_KEY), put it in .env in this folder, or run scripts\setup_api_and_run.cmd
goto :fail

:batch_size
rem Batch size: Enter accepts 20; anything but a positive whole number is asked again.
set "BATCH_SIZE="
set /p "BATCH_SIZE=Batch size [20]: "
if not defined BATCH_SIZE set "BATCH_SIZE=20"
set "BAD="
setlocal EnableDelayedExpansion
if "!BATCH_SIZE:~0,1!"=="0" set "BAD=1"
for /f "eol=0 delims=0123456789" %%A in ("!BATCH_SIZE!") do set "BAD=1"
endlocal & set "BAD=%BAD%"
if not defined BAD goto :index
echo please type a positive whole number (e.g. 20), or press Enter for 20
goto :batch_size

:index
rem The index: prepared from DATA_ROOT when missing, reused when present.
if exist "%INDEX_FILE_W%" goto :index_found
echo preparing the index %INDEX_FILE% from %DATA_ROOT%
%PYTHON% -m pipeline prepare --root "%DATA_ROOT%" --out "%INDEX_FILE%"
set "RC=%ERRORLEVEL%"
if not "%RC%"=="0" goto :finish
goto :run
:index_found
echo using the index %INDEX_FILE% (delete it to prepare it again)

:run
rem Run.
%PYTHON% -m pipeline run --index "%INDEX_FILE%" --out "%OUTPUT_DIR%" --prompt-file "%PROMPT_FILE%" --batch-size %BATCH_SIZE% %REID_PROMPT_ARGS%
set "RC=%ERRORLEVEL%"

rem The files written.
if not exist "%OUTPUT_DIR_W%\" goto :finish
echo Files in %OUTPUT_DIR%:
for %%F in ("%OUTPUT_DIR_W%\*") do echo   %%~nxF  (%%~zF bytes)
goto :finish

:fail
set "RC=2"
:finish
if defined OLD_CP chcp %OLD_CP% >nul
rem Keep a double-clicked window open to read; REID_PROMPT_NO_PAUSE skips it.
if not defined REID_PROMPT_NO_PAUSE pause
exit /b %RC%

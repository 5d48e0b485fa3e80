@echo off
rem Set the API key (and, optionally, an OpenAI-compatible server), offer to keep them in .env in the
rem current folder, then caption with scripts\batch_generate_captions.cmd. The same steps, in the same order,
rem as scripts/setup_api_and_run.sh. Double-click it, or run it from the folder that holds your data and outputs.
rem
rem The key is read hidden (PowerShell's Read-Host -AsSecureString; where PowerShell is missing it is
rem typed visibly with set /p) and is never printed. The variables batch_generate_captions.cmd reads
rem (DATA_ROOT, INDEX_FILE, OUTPUT_DIR, PROMPT_FILE, REID_PROMPT_ARGS, PYTHON, REID_PROMPT_NO_PAUSE) apply here too.
rem Exit code: the batch script's (the run's); 2 when no key is given and none is set.

setlocal EnableExtensions DisableDelayedExpansion
set "RC=0"

rem UTF-8 output: the console's code page (the old one is restored at the end) and Python's streams.
for /f "tokens=2 delims=:." %%C in ('chcp') do set "OLD_CP=%%C"
chcp 65001 >nul
set "PYTHONIOENCODING=utf-8"

rem The key, read without echo. Only the line starting with "key:" is taken, whatever else PowerShell prints.
set "NEW_KEY="
<nul set /p "=API key (input hidden; Enter keeps the key already set): "
where powershell >nul 2>nul || goto :key_plain
for /f "usebackq tokens=1,* delims=:" %%A in (`powershell -NoProfile -Command "$s = Read-Host -AsSecureString; [Environment]::NewLine + 'key:' + (New-Object Net.NetworkCredential('', $s)).Password"`) do if "%%A"=="key" set "NEW_KEY=%%B"
echo.
goto :key_read
:key_plain
set /p "NEW_KEY=(shown as you type) "
:key_read
set "EXISTING="
for %%V in (OPENAI_API_KEY DASHSCOPE_API_KEY GEMINI_API_KEY OPENROUTER_API_KEY AZURE_OPENAI_API_KEY) do if defined %%V set "EXISTING=1"
if exist ".env" (findstr /r /i /c:"^[A-Z_ ]*API_KEY *= *[^ #]" ".env" >nul 2>nul && set "EXISTING=1")
if defined NEW_KEY goto :key_set
if defined EXISTING goto :base_url
>&2 echo error: no API key given, and none is set (OPENAI_API_KEY, your provider's key variable, or .env)
set "RC=2"
goto :finish
:key_set
set "OPENAI_API_KEY=%NEW_KEY%"

:base_url
rem Optionally another OpenAI-compatible server, and its model.
set "BASE_URL="
set /p "BASE_URL=Base URL of an OpenAI-compatible server (Enter for OpenAI; DashScope: https://dashscope-intl.aliyuncs.com/compatible-mode/v1): "
if not defined BASE_URL goto :save
set "OPENAI_BASE_URL=%BASE_URL%"
set "MODEL="
set /p "MODEL=Model on that server (Enter for reid-prompt's default; e.g. qwen-vl-plus): "
if not defined MODEL goto :save
set "REID_PROMPT_ARGS=--model %MODEL% %REID_PROMPT_ARGS%"
echo next time, set REID_PROMPT_ARGS=--model %MODEL% to use it again

:save
rem Offer to keep what was typed in .env (the key itself is never shown).
if defined NEW_KEY goto :save_ask
if not defined BASE_URL goto :caption
:save_ask
set "ANSWER="
set /p "ANSWER=Save it in .env in this folder? [Y/n]: "
if not defined ANSWER goto :save_yes
if /i "%ANSWER%"=="y" goto :save_yes
if /i "%ANSWER%"=="yes" goto :save_yes
echo not saved
goto :caption
:save_yes
if defined NEW_KEY call :set_env_line OPENAI_API_KEY
if defined BASE_URL call :set_env_line OPENAI_BASE_URL
echo saved in %CD%\.env (keep it out of version control)

:caption
rem Caption: the batch script asks for the batch size, runs, lists the files and passes its exit code on.
call "%~dp0batch_generate_captions.cmd"
set "RC=%ERRORLEVEL%"
if defined OLD_CP chcp %OLD_CP% >nul
exit /b %RC%

:finish
if defined OLD_CP chcp %OLD_CP% >nul
if not defined REID_PROMPT_NO_PAUSE pause
exit /b %RC%

:set_env_line
rem Write NAME=value (the value taken from the variable NAME, never echoed to the screen) as the first line
rem of .env and keep every other line as it was, minus the old NAME line.
setlocal EnableDelayedExpansion
> ".env.tmp" echo(%~1=!%~1!
endlocal
if exist ".env" findstr /v /r /i /c:"^ *%~1 *=" /c:"^ *export  *%~1 *=" ".env" >> ".env.tmp"
move /y ".env.tmp" ".env" >nul
exit /b 0

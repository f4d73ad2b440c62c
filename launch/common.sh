# shellcheck shell=bash
# Shared helpers of the launch/*.sh scripts (sourced, not run).
#
#   parse_opts "VALUE OPTIONS" "FLAG OPTIONS" "$@"
#       Long options only: --name=VALUE and --name VALUE both work; flags take no value.
#       Values land in OPT[name] (every listed option starts as ""; flags become 1).
#       --dry-run sets DRY_RUN=1, --help prints the script's header comment, words after
#       "--" land in EXTRA_ARGS. Unknown options and stray words are errors (exit 2).
#   require NAME...     exit 2 naming the first listed option that is empty.
#   run CMD...          --dry-run: print "+ CMD" (shell-quoted, pasteable) on stdout and
#                       run nothing; otherwise print it on stderr and run it.
#   run_exec CMD...     like run, but exec's CMD.
#   quote WORD...       the words shell-quoted and joined by spaces (for remote commands).

PROG=${0##*/}
DRY_RUN=0
EXTRA_ARGS=()
declare -A OPT=()

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "run '%s --help' for the options\n" "$PROG" >&2
  exit 2
}

usage() {  # the script's leading comment block
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

parse_opts() {
  local values=" $1 " flags=" $2 " arg name val
  shift 2
  for name in $values $flags; do OPT[$name]=""; done
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --) EXTRA_ARGS=("$@"); return 0 ;;
      --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --dry-run=* | --help=*) die "option ${arg%%=*} takes no value" ;;
      --*=*)
        name=${arg%%=*}
        name=${name#--}
        val=${arg#*=}
        if [[ $flags == *" $name "* ]]; then die "option --$name takes no value"; fi
        if [[ $values != *" $name "* ]]; then die "unknown option: --$name"; fi
        ;;
      --*)
        name=${arg#--}
        if [[ $flags == *" $name "* ]]; then
          val=1
        elif [[ $values == *" $name "* ]]; then
          if (($# == 0)) || [[ $1 == --* ]]; then die "option --$name needs a value"; fi
          val=$1
          shift
        else
          die "unknown option: $arg"
        fi
        ;;
      *) die "unexpected argument: '$arg' (options are --long; arguments for adm_jax.main go after --)" ;;
    esac
    OPT[$name]=$val
  done
}

require() {
  local name
  for name; do
    if [[ -z ${OPT[$name]:-} ]]; then die "missing required option --$name"; fi
  done
}

no_extra_args() {
  if ((${#EXTRA_ARGS[@]})); then die "no arguments after -- are accepted: ${EXTRA_ARGS[*]}"; fi
}

need_int() {  # need_int NAME VALUE: VALUE is a non-negative integer
  if [[ ! $2 =~ ^[0-9]+$ ]]; then die "--$1 must be a non-negative integer, got '$2'"; fi
}

quote() {  # plain words stay bare; others are single-quoted (readable, pasteable, shlex-safe)
  local word q out=()
  for word; do
    printf -v q '%q' "$word"
    if [[ $q == "$word" ]]; then out+=("$word"); else out+=("${word@Q}"); fi
  done
  printf '%s' "${out[*]}"
}

remote_path() {  # a path for a remote shell command: a leading ~/ stays expandable
  local tilde=\~
  if [[ $1 == "$tilde"/* ]]; then
    printf '%s/%s' "$tilde" "$(quote "${1#"$tilde"/}")"
  else
    quote "$1"
  fi
}

run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote "$@")"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    "$@"
  fi
}

run_exec() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote "$@")"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    exec "$@"
  fi
}

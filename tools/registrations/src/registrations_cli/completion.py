"""`registrations completion bash|zsh`: a completion script made from the argparse parser itself,
so that a new command or option completes as soon as it exists.

Pure code. The parser is walked into one `Node` per command path (`""`, `"failed"`, `"failed
replay"`, ...): its subcommands, its options, which options take a value (and which values),
and whether its positional argument is a file. Each script then holds the same three tables as
shell `case` statements: the command path is found by walking the words typed so far, skipping
options and their values.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh")
PROG = "registrations"
FUNCTION = "_registrations"


@dataclass
class Option:
    names: list[str]
    help: str
    takes_value: bool
    choices: list[str]


@dataclass
class Node:
    path: str
    commands: list[tuple[str, str]] = field(default_factory=list)  # (name, help)
    options: list[Option] = field(default_factory=list)
    files: bool = False  # its positional argument is a file name


def walk(parser: argparse.ArgumentParser, path: str = "") -> list[Node]:
    node = Node(path)
    nodes = [node]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                node.commands.append((name, helps.get(name, "")))
                nodes += walk(sub, f"{path} {name}".strip())
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            # An optional value (nargs="?", as `stats --watch`) is left to be typed: completing
            # after it offers the next option instead.
            node.options.append(Option(list(action.option_strings), _one_line(action.help or ""),
                                       action.nargs not in (0, "?"), [str(c) for c in action.choices or ()]))
        elif action.choices:
            node.commands += [(str(c), _one_line(action.help or "")) for c in action.choices]
        elif action.metavar == "FILE":
            node.files = True
    return nodes


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    nodes = walk(parser)
    if shell == "bash":
        return _bash(nodes)
    if shell == "zsh":
        return _zsh(nodes)
    raise ValueError(f"no completion for {shell!r}")


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("%%", "%")


def _quote(text: str) -> str:
    """Single-quoted for either shell: nothing inside is expanded."""
    return "'" + text.replace("'", "'\\''") + "'"


def _path_cases(nodes: list[Node]) -> str:
    return " | ".join(_quote(n.path) for n in nodes if n.path)


def _valued(nodes: list[Node]) -> Iterator[tuple[str, Option]]:
    """Each option that takes a value, with the case pattern both shells match it by: the
    command's path and the option's names (`failed replay:--stage|failed replay:-s`)."""
    for node in nodes:
        for option in node.options:
            if option.takes_value:
                yield "|".join(_quote(f"{node.path}:{name}") for name in option.names), option


def _bash(nodes: list[Node]) -> str:
    value_cases = []
    for names, option in _valued(nodes):
        reply = (f'COMPREPLY=($(compgen -W {_quote(" ".join(option.choices))} -- "$cur"))'
                 if option.choices else "COMPREPLY=()")
        value_cases.append(f"        {names}) {reply}; return ;;")
    word_cases = []
    for node in nodes:
        words = [name for name, _ in node.commands] + [n for o in node.options for n in o.names]
        files = ' compopt -o filenames; COMPREPLY+=($(compgen -f -- "$cur"));' if node.files else ""
        word_cases.append(f'        {_quote(node.path)}) COMPREPLY=($(compgen -W {_quote(" ".join(words))} -- "$cur"));'
                          f"{files} ;;")
    return f"""# bash completion for {PROG}: eval "$({PROG} completion bash)"
{FUNCTION}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" path="" word i
    (( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for (( i = 1; i < COMP_CWORD; i++ )); do
        word="${{COMP_WORDS[i]}}"
        case "${{path:+$path }}$word" in
            {_path_cases(nodes)}) path="${{path:+$path }}$word" ;;
        esac
    done
    case "$path:$prev" in
{chr(10).join(value_cases)}
    esac
    case "$path" in
{chr(10).join(word_cases)}
    esac
}}
complete -F {FUNCTION} {PROG}
"""


def _zsh(nodes: list[Node]) -> str:
    value_cases = []
    for names, option in _valued(nodes):
        choices = " ".join(_quote(c) for c in option.choices)
        reply = f"compadd -- {choices}" if option.choices else "_message value"
        value_cases.append(f"    ({names}) {reply}; return ;;")
    word_cases = []
    for node in nodes:
        items = [f"{name}:{help_}" for name, help_ in node.commands]
        items += [f"{n}:{o.help}" for o in node.options for n in o.names]
        files = " _files;" if node.files else ""
        word_cases.append(f"    ({_quote(node.path)}) items=({' '.join(_quote(i) for i in items)});{files} ;;")
    return f"""#compdef {PROG}
# zsh completion for {PROG}: eval "$({PROG} completion zsh)" after compinit, or save as _{PROG} in $fpath
{FUNCTION}() {{
  local path_="" word prev="${{words[CURRENT-1]}}" i
  local -a items
  for (( i = 2; i < CURRENT; i++ )); do
    word="${{words[i]}}"
    case "${{path_:+$path_ }}$word" in
      ({_path_cases(nodes)}) path_="${{path_:+$path_ }}$word" ;;
    esac
  done
  case "$path_:$prev" in
{chr(10).join(value_cases)}
  esac
  case "$path_" in
{chr(10).join(word_cases)}
  esac
  _describe -t commands {PROG} items
}}
if [[ "${{zsh_eval_context[-1]}}" == loadautofunc ]]; then
  {FUNCTION} "$@"
else
  compdef {FUNCTION} {PROG}
fi
"""

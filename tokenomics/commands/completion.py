"""`tokenomics completion`: bash, zsh and fish completion scripts, read off the parser itself."""

import argparse

from . import out


def cmd_completion(args) -> int:
    parser = args.full_parser()  # handed in by the CLI, which builds the parser
    commands = {}
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            words = []
            for sub_action in sub._actions:
                words += [o for o in sub_action.option_strings if o.startswith("--")]
                if isinstance(sub_action, argparse._SubParsersAction):
                    words += list(sub_action.choices)
            commands[name] = sorted(set(words))
    names = " ".join(sorted(commands))
    if args.shell == "bash":
        cases = "\n".join(f'        {n}) opts="{" ".join(w)}" ;;' for n, w in sorted(commands.items()))
        out(f"""_tokenomics() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} cmd=${{COMP_WORDS[1]}} opts
    if [ "$COMP_CWORD" -eq 1 ]; then COMPREPLY=($(compgen -W "{names} --config --dir --help" -- "$cur")); return; fi
    case "$cmd" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F _tokenomics tokenomics""")
    elif args.shell == "zsh":
        out("#compdef tokenomics\n_tokenomics() {\n  local -a cmds\n  cmds=(" + names + ")\n"
             "  if (( CURRENT == 2 )); then _describe 'command' cmds; return; fi\n  case $words[2] in\n"
             + "\n".join(f"    {n}) _arguments '*:arg:({' '.join(w)})' ;;" for n, w in sorted(commands.items()))
             + "\n  esac\n}\ncompdef _tokenomics tokenomics")
    else:
        lines = [f"complete -c tokenomics -f -n '__fish_use_subcommand' -a '{names}'"]
        for n, words in sorted(commands.items()):
            for w in words:
                if w.startswith("--"):
                    lines.append(f"complete -c tokenomics -n '__fish_seen_subcommand_from {n}' -l {w[2:]}")
                else:
                    lines.append(f"complete -c tokenomics -f -n '__fish_seen_subcommand_from {n}' -a {w}")
        out("\n".join(lines))
    return 0


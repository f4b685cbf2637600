"""The gateway's configuration as a YAML file: export, diff, apply, rollback.

    manage.py gatewayconfig export [-o gateway.yaml] [--secrets-env secrets.env]
    manage.py gatewayconfig diff -f gateway.yaml [--exit-code]
    manage.py gatewayconfig apply -f gateway.yaml [--yes]
    manage.py gatewayconfig rollback N [--yes]
    manage.py gatewayconfig bump [--reason TEXT]

`-f -` reads standard input. Exit status: 0 done (or nothing to change), 1 an invalid file
or a refused change (every problem printed as file:line: field: message), 2 with
`diff --exit-code` when there are changes. `apply` and `rollback` print the changes first;
removals need `--yes` when standard input is not a terminal to confirm on.
"""

from __future__ import annotations

import os
import sys

from django.core.management.base import BaseCommand, CommandError

from gateway import declarative


class Command(BaseCommand):
    help = "Export, diff, apply or roll back the gateway's configuration as a YAML file."

    def add_arguments(self, parser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        export = sub.add_parser("export", help="Write the configuration as YAML.")
        export.add_argument("-o", "--output", default="-", help="file (default: stdout)")
        export.add_argument(
            "--secrets-env",
            metavar="FILE",
            help="also write the secrets the file references as NAME=value lines (mode 0600)",
        )
        export.add_argument(
            "--inline-secrets",
            action="store_true",
            help="write secret values into the file instead of ${…} references",
        )
        diff = sub.add_parser("diff", help="Show what applying a file would change.")
        diff.add_argument("-f", "--file", required=True)
        diff.add_argument("--exit-code", action="store_true", help="exit 2 when there are changes")
        apply = sub.add_parser("apply", help="Make the configuration what the file says.")
        apply.add_argument("-f", "--file", required=True)
        apply.add_argument("--yes", action="store_true", help="do not ask before removing")
        rollback = sub.add_parser("rollback", help="Restore the configuration of version N.")
        rollback.add_argument("version", type=int)
        rollback.add_argument("--yes", action="store_true", help="do not ask before removing")
        bump = sub.add_parser(
            "bump",
            help="Make every gateway rebuild its snapshot: after changing the database by hand "
            "(SQL, a shell, a data migration), which the admin, REST API and portal do for you.",
        )
        bump.add_argument("--reason", default="manual bump (gatewayconfig)")

    def handle(self, *args, **options):
        action = options["action"]
        if action == "bump":
            from django.db import transaction

            from gateway.config import config_bump

            with transaction.atomic():
                version = config_bump(reason=options["reason"])
            self.stdout.write(f"config version {version}: every gateway rebuilds its snapshot")
            return None
        if action == "export":
            return self.export(options)
        if action == "rollback":
            try:
                at, document = declarative.document_at(options["version"])
            except LookupError as exc:
                raise CommandError(str(exc)) from None
            desired = declarative.parse_document(document, f"config version {at}")
            reason = f"rollback to v{options['version']} (gatewayconfig)"
            return self.apply(desired, options, reason=reason)
        desired = self.read(options["file"])
        if action == "diff":
            outcome = self.run(desired, dry_run=True)
            self.show(outcome)
            if options["exit_code"] and outcome.changes:
                sys.exit(2)
            return None
        name = os.path.basename(options["file"]) if options["file"] != "-" else "stdin"
        return self.apply(desired, options, reason=f"gatewayconfig apply {name}")

    def export(self, options) -> None:
        secrets = "inline" if options["inline_secrets"] else "references"
        document = declarative.current_document()
        twins = declarative.duplicates(document)
        if twins:
            raise CommandError(
                "These cannot be told apart in a file (rename one of each in admin): "
                + ", ".join(twins)
            )
        file_doc, found = declarative.to_file_document(document, secrets=secrets)
        text = declarative.dump_yaml(file_doc)
        if options["output"] == "-":
            self.stdout.write(text, ending="")
        else:
            with open(options["output"], "w", encoding="utf-8") as fh:
                fh.write(text)
        if found:
            names = ", ".join(sorted(found))
            self.stderr.write(f"The file references {len(found)} secret(s): {names}")
            if options["secrets_env"]:
                fd = os.open(options["secrets_env"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    for name in sorted(found):
                        fh.write(f"{name}={found[name]}\n")
                self.stderr.write(f"Their values are in {options['secrets_env']}.")
            else:
                self.stderr.write("Set them in the environment before applying the file.")

    def read(self, path: str) -> declarative.Desired:
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"{path}: {exc}") from None
        try:
            return declarative.parse_yaml(text, "stdin" if path == "-" else path)
        except declarative.ConfigFileError as exc:
            raise CommandError(exc.render()) from None

    def run(self, desired, *, dry_run: bool, reason: str = "") -> declarative.Outcome:
        try:
            return declarative.apply(desired, reason=reason, dry_run=dry_run)
        except declarative.ConfigFileError as exc:
            raise CommandError(exc.render()) from None

    def show(self, outcome: declarative.Outcome) -> None:
        if not outcome.changes:
            self.stdout.write("No changes.")
            return
        for change in outcome.changes:
            self.stdout.write(change.render())

    def apply(self, desired, options, *, reason: str) -> None:
        preview = self.run(desired, dry_run=True)
        self.show(preview)
        if not preview.changes:
            return
        removals = sum(1 for c in preview.changes if c.op == "-")
        if removals and not options["yes"]:
            if not sys.stdin.isatty():
                raise CommandError(
                    f"{removals} object(s) would be removed; run again with --yes to apply."
                )
            answer = input(f"Remove {removals} object(s) and apply? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("Nothing applied.")
        outcome = self.run(desired, dry_run=False, reason=reason)
        self.stdout.write(
            f"Applied {len(outcome.changes)} change(s) as config version {outcome.version}."
        )

"""Regenerate services/atlasflow/labels/ps315_table_e1_1.json, the de-identification table.

The table is DICOM PS3.15 Annex E Table E.1-1 ("Application Level Confidentiality Profile
Attributes": every attribute with its Basic Profile action and the action of each option),
as parsed from the standard's HTML by Innolitics' dicom-standard project
(https://github.com/innolitics/dicom-standard, MIT licence, regenerated monthly from the
current standard): its file standard/confidentiality_profile_attributes.json.

Usage (from a clone of innolitics/dicom-standard at the commit you want):

    python scripts/update_deid_table.py <clone>/standard/confidentiality_profile_attributes.json \
        --standard "DICOM PS3.15 2024b" --commit <innolitics commit> [--licence <clone>/LICENSE.txt]

The rows are copied verbatim (keys: name, tag, stdCompIOD, basicProfile and one key per
option column that has an action: rtnSafePrivOpt, rtnUIDsOpt, rtnDevIdOpt, rtnInstIdOpt,
rtnPatCharsOpt, rtnLongFullDatesOpt, rtnLongModifDatesOpt, cleanDescOpt, cleanStructContOpt,
cleanGraphOpt), sorted by tag, wrapped with their source, the standard's revision and the
MIT licence text. atlasflow.labels.deid reads it; tests/labels/test_labels_deid.py checks
every row against a real series.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "services/atlasflow/labels/ps315_table_e1_1.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--standard", required=True, help='e.g. "DICOM PS3.15 2024b"')
    parser.add_argument("--commit", required=True, help="the innolitics/dicom-standard commit")
    parser.add_argument("--licence", type=Path, help="the project's LICENSE.txt (kept with the table)")
    args = parser.parse_args()
    rows = json.loads(args.table.read_text())
    licence = args.licence.read_text() if args.licence else json.loads(OUT.read_text())["licence"]
    doc = {
        "title": "DICOM PS3.15 Annex E Table E.1-1 Application Level Confidentiality Profile Attributes",
        "standard": args.standard,
        "source": "https://github.com/innolitics/dicom-standard standard/confidentiality_profile_attributes.json",
        "source_commit": args.commit,
        "generator": "scripts/update_deid_table.py",
        "licence": licence,
        "attributes": sorted(rows, key=lambda r: str(r["tag"])),
    }
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(rows)} attributes ({args.standard})")


if __name__ == "__main__":
    main()

"""Notes: synthetic discharge notes (pneumonia vs other diagnoses, each hospital with its own
writing style), and pooled notes files dealt out to sites, both written as the CSV or JSONL the
notes loader (``client/tasks/notes.py``) reads under the same ``task.*`` columns."""

from __future__ import annotations

import csv
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.tasks import DataError
from client.tasks.notes import (
    LabelMap,
    check_spec,
    csv_delimiter,
    field_text,
    file_format,
    read_notes,
    site_file,
)
from simulations.synthetic.base import PooledRecords, SiteGenerator, SiteProfile
from simulations.synthetic.registry import register_generator


@register_generator
class NotesGenerator(SiteGenerator):
    name = "notes"

    def index_pooled(
        self, path: Path, task_cfg: Mapping[str, Any], site_column: str | None = None
    ) -> PooledRecords:
        """Records are the labelled rows (unlabelled rows cannot be dealt out by label); rows
        with an empty text stay records, so the site that gets them counts them as skipped."""
        path = site_file(Path(path), task_cfg)
        columns, notes = read_notes(path, task_cfg)
        if site_column and site_column not in columns:
            raise DataError(f"{path}: no site column {site_column!r} (data.site_column); found "
                            f"columns {columns}")
        notes = [n for n in notes if n.label is not None]
        groups = None
        if site_column:
            groups = np.array([field_text(n.fields.get(site_column)) for n in notes], dtype=object)
        return PooledRecords(
            labels=np.array([n.label for n in notes], dtype=np.int64),
            is_test=np.array([n.is_test for n in notes], dtype=bool),
            groups=groups,
        )

    def write_partition(
        self, path: Path, task_cfg: Mapping[str, Any], folder: Path, records: np.ndarray
    ) -> None:
        split_col = task_cfg.get("split_column")
        if not split_col:
            raise DataError("writing a partition needs task.split_column (each site's file "
                            "records its rows' train/test membership there)")
        source = site_file(Path(path), task_cfg)
        columns, notes = read_notes(source, task_cfg)
        notes = [n for n in notes if n.label is not None]
        if str(split_col) not in columns:
            columns = [*columns, str(split_col)]
        rows = [{**notes[i].fields, str(split_col): "test" if notes[i].is_test else "train"}
                for i in np.asarray(records, dtype=np.int64)]
        _write_notes(Path(folder) / str(task_cfg.get("file", "notes.csv")), task_cfg,
                     columns, rows)

    def generate_site(
        self, folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile, seed: int
    ) -> None:
        rng = np.random.default_rng([seed, profile.index, 3])
        check_spec(task_cfg["spec"])
        LabelMap(task_cfg)  # class_names must match num_classes before names are written
        num_classes = int(task_cfg["spec"]["num_classes"])
        if num_classes > len(CONDITIONS) + 1:
            raise DataError(f"the synthetic notes generator knows {len(CONDITIONS)} conditions "
                            f"(+ other); task.spec.num_classes={num_classes} is too many")
        style = NoteStyle.from_shift(profile.shift)
        names = task_cfg.get("class_names")
        text_col = str(task_cfg.get("text_column", "text"))
        label_col = str(task_cfg.get("label_column", "label"))
        split_col = str(task_cfg.get("split_column") or "split")
        id_col = str(task_cfg.get("id_column") or "note_id")
        columns = [id_col, "subject_id", "chartdate", "category", text_col, label_col, split_col]
        splits = ["train"] * profile.num_train + ["test"] * profile.num_test
        rng.shuffle(splits)
        rows = []
        for i, split in enumerate(splits):
            label = int(rng.choice(len(profile.class_weights), p=profile.class_weights))
            content = label
            if rng.uniform() < LABEL_NOISE:  # the recorded label disagrees with the note
                content = int((label + rng.integers(1, num_classes)) % num_classes)
            if rng.uniform() < 0.015:  # realistic mess: a few exported rows have no text
                text = "" if rng.uniform() < 0.6 else " "
            else:
                text = synthetic_note(content, num_classes, style, rng)
            rows.append({
                id_col: f"{profile.index + 1:02d}-{100000 + 7 * i + int(rng.integers(7))}",
                "subject_id": int(rng.integers(10_000, 99_999)),
                "chartdate": f"2131-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}",
                "category": "Discharge summary",
                text_col: text,
                label_col: str(names[label]) if names else label,
                split_col: split,
            })
        _write_notes(Path(folder) / str(task_cfg.get("file", "notes.csv")), task_cfg,
                     columns, rows)


def _write_notes(path: Path, task_cfg: Mapping[str, Any], columns: list[str],
                 rows: list[Mapping[str, Any]]) -> None:
    """Write rows in the format ``path`` has under ``task_cfg`` (the site format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format(path, task_cfg) == "jsonl":
        with path.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({c: row.get(c) for c in columns if c in row},
                                     ensure_ascii=False) + "\n")
        return
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, delimiter=csv_delimiter(path, task_cfg))
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else
                             (json.dumps(row[c]) if isinstance(row[c], (dict, list)) else row[c])
                             for c in columns])


# ---------------------------------------------------------------------------------------------
# Synthetic discharge notes
#
# What makes them hard, as real discharge notes are (each measured in docs/utility.md):
# - two in five pneumonia notes never name it: findings and treatment only, and every such
#   finding also appears in notes of other diagnoses (bronchitis, influenza, heart failure,
#   atelectasis, aspiration pneumonitis, urinary sepsis);
# - notes of other diagnoses name pneumonia often: negated ("no evidence of pneumonia"),
#   ruled out after an initial concern, in the history ("prior admission with pneumonia");
# - each hospital has its own wording (infiltrate or airspace opacity, rales or crackles, its
#   antibiotics): a site sees only part of the vocabulary the pooled test set uses;
# - labels from billing codes or chart review disagree with the note now and then, and notes
#   that only say "possible pneumonia" are labelled either way.


@dataclass(frozen=True)
class NoteStyle:
    """A hospital's writing style, the site shift of the notes task."""

    abbreviation: float  # probability that a term is written abbreviated (PNA, CHF, SOB, w/)
    template: int  # 0: CAPS section headers, 1: dashed headers and bullets, 2: one paragraph
    filler: tuple[int, int]  # note length: hospital course of 40 + 5*k words, k in this range
    typo_rate: float  # per-word probability of a typo
    negation: int  # preferred phrasing of a negated finding
    lexicon: int  # which synonym of each WORDING group this hospital prefers (a seed)

    @classmethod
    def from_shift(cls, shift: Mapping[str, float]) -> NoteStyle:
        u, v, w = float(shift["u"]), float(shift["v"]), float(shift["w"])
        low = 1 + int(5 * v)
        return cls(
            abbreviation=0.05 + 0.9 * u,
            template=min(2, int(3 * ((u + 2 * v + 3 * w) % 1.0))),
            filler=(low, low + 2 + int(8 * w)),
            typo_rate=0.04 * w,
            negation=min(2, int(3 * ((u + w) % 1.0))),
            lexicon=zlib.crc32(f"{u:.6f} {v:.6f} {w:.6f}".encode()),
        )

    def preferred(self, group: str) -> int:
        """This hospital's own word for ``group`` (an index into ``WORDING[group]``)."""
        return zlib.crc32(f"{group}:{self.lexicon}".encode()) % len(WORDING[group])


# Terms written spelled out or abbreviated depending on the site's style.
TERMS: dict[str, tuple[str, str]] = {
    "pt": ("the patient", "pt"), "pna": ("pneumonia", "PNA"),
    "cap": ("community-acquired pneumonia", "CAP"), "chf": ("congestive heart failure", "CHF"),
    "hf": ("heart failure", "HF"), "copd": ("chronic obstructive pulmonary disease", "COPD"),
    "sob": ("shortness of breath", "SOB"), "doe": ("dyspnea on exertion", "DOE"),
    "cxr": ("chest x-ray", "CXR"), "hx": ("history of", "h/o"), "w": ("with", "w/"),
    "wo": ("without", "w/o"), "ro": ("was ruled out", "r/o"), "abx": ("antibiotics", "abx"),
    "iv": ("intravenous", "IV"), "wbc": ("white blood cell count", "WBC"),
    "le": ("lower extremity", "LE"), "bid": ("twice daily", "BID"), "fu": ("follow up", "f/u"),
    "pcp": ("primary care physician", "PCP"), "ed": ("emergency department", "ED"),
    "ef": ("ejection fraction", "EF"), "bnp": ("BNP", "BNP"),
    "uti": ("urinary tract infection", "UTI"), "afib": ("atrial fibrillation", "AFib"),
    "htn": ("hypertension", "HTN"), "dm": ("diabetes mellitus", "DM"),
    "ckd": ("chronic kidney disease", "CKD"), "yo": ("year-old", "yo"),
    "rll": ("right lower lobe", "RLL"), "lll": ("left lower lobe", "LLL"),
    "pe": ("pulmonary embolism", "PE"), "ct": ("CT", "CT"),
}
# Synonyms: each hospital writes its own one most of the time (NoteStyle.preferred), so the
# words that signal a finding differ between sites.
WORDING: dict[str, tuple[str, ...]] = {
    "opacity": ("consolidation", "infiltrate", "airspace opacity", "airspace disease"),
    "crackles": ("crackles", "rales", "coarse breath sounds", "rhonchi"),
    "sputum": ("productive cough", "cough productive of yellow sputum", "purulent sputum",
               "wet cough"),
    "febrile": ("febrile to {temp}", "Tmax {temp}", "temperature of {temp}", "fever to {temp}"),
    "hypoxia": ("required 2 liters nasal cannula", "hypoxic to 88 percent on room air",
                "desaturated to 89 percent and was placed on oxygen", "a new oxygen requirement"),
    "leukocytosis": ("{wbc} {wbc_value}", "leukocytosis to {wbc_value}",
                     "procalcitonin {pct_value}", "left shift {w} {wbc} {wbc_value}"),
    "abx_course": ("ceftriaxone and azithromycin", "levofloxacin", "vancomycin and cefepime",
                   "amoxicillin-clavulanate", "doxycycline"),
    "pna_name": ("{pna}", "{cap}", "{lobe} {pna}", "lobar pneumonia", "multifocal pneumonia",
                 "bronchopneumonia"),
}
SITE_WORDING = 0.8  # share of a group's mentions in the hospital's own word
NUMBERS = {
    "age": lambda r: str(int(r.integers(28, 95))),
    "days": lambda r: str(int(r.integers(3, 8))),
    "temp": lambda r: f"{r.uniform(38.1, 39.8):.1f}",
    "wbc_value": lambda r: f"{r.uniform(11, 21):.1f}",
    "pct_value": lambda r: f"{r.uniform(0.6, 4.0):.1f}",
    "bnp_value": lambda r: str(int(r.integers(600, 3000))),
    "ef_value": lambda r: str(int(r.integers(15, 40))),
    "year": lambda r: str(int(r.integers(2118, 2130))),
    "sex": lambda r: "man" if r.uniform() < 0.5 else "woman",
    "side": lambda r: "right" if r.uniform() < 0.5 else "left",
    "lobe": lambda r: "{rll}" if r.uniform() < 0.6 else "{lll}",
}


@dataclass(frozen=True)
class Condition:
    name: str  # the term key of its name, for negated and historical mentions
    complaint: tuple[str, ...]
    strong: tuple[str, ...]  # sentences that state the condition
    support: tuple[str, ...]  # findings that suggest it (each shared with other diagnoses)
    diagnosis: tuple[str, ...]  # discharge diagnosis lines
    vague: tuple[str, ...]  # discharge diagnosis lines of a note that never names it


PNEUMONIA_FINDINGS = (
    "Presented {w} {sputum} and {febrile}.", "{crackles} at the {side} base.",
    "{leukocytosis} on admission.", "{hypoxia}, weaned to room air.",
    "Pleuritic chest pain and {sob}.", "Blood cultures no growth to date.",
    "{cxr} {w} {lobe} {opacity}.", "Started on {abx_course}.",
    "Completed a {days} day course of {abx_course}.", "{sputum} improved on {abx}.",
)
CONDITIONS = (
    Condition(
        "pna", ("cough and fever", "{sob}", "fever", "{sputum}"),
        ("Admitted {w} {pna_name}.", "{cxr} showed {lobe} {opacity} consistent {w} {pna_name}.",
         "Treated for {pna_name} {w} {abx_course}.",
         "{pna_name} improved on {abx} and {pt} was transitioned to oral levofloxacin.",
         "Sputum culture grew streptococcus pneumoniae.",
         "Completed a {days} day course of {abx} for {pna_name}.",
         "{lobe} {opacity} on imaging, started on {abx} for {pna_name}."),
        PNEUMONIA_FINDINGS,
        ("{pna_name}",),
        ("lower respiratory tract infection", "sepsis", "acute hypoxic respiratory failure",
         "cough and fever"),
    ),
    Condition(
        "chf", ("{sob}", "leg swelling", "{doe}"),
        ("Admitted for acute on chronic systolic {chf} exacerbation.",
         "Diuresed {w} {iv} furosemide, net negative {days} liters.",
         "{cxr} showed pulmonary edema and small bilateral effusions.",
         "{bnp} elevated at {bnp_value}.", "Echo {w} {ef} of {ef_value} percent.",
         "Volume overloaded {w} bilateral {le} edema and orthopnea.",
         "Discharged on a higher dose of torsemide for {hf}."),
        ("{sob} and {doe} for one week.", "{crackles} at the {side} base.", "Weight up 4 kg.",
         "Jugular venous distension on exam.", "{hypoxia}, weaned to room air."),
        ("acute on chronic {chf}", "{hf} exacerbation", "decompensated {chf}"),
        ("volume overload", "acute hypoxic respiratory failure"),
    ),
    Condition(
        "copd", ("{sob}", "wheezing", "cough"),
        ("Admitted {w} {copd} exacerbation.", "Diffuse expiratory wheezing on exam.",
         "Treated {w} nebulized albuterol and ipratropium and a prednisone burst.",
         "{cxr} {wo} focal {opacity}, hyperinflated lungs.",
         "{copd} on home oxygen, active smoker."),
        ("{sob} and wheezing.", "{sputum} {w} increased sputum.",
         "Completed a {days} day course of azithromycin.", "{hypoxia}, weaned to room air.",
         "Started on doxycycline."),
        ("{copd} exacerbation", "acute exacerbation of {copd}"),
        ("hypoxic respiratory failure", "bronchospasm"),
    ),
)
# Negative notes: (complaints, hospital course, discharge diagnosis). The respiratory mimics
# share the findings, images and antibiotics of pneumonia without being pneumonia.
RESPIRATORY_MIMICS = (
    (("cough and fever", "fever"),
     ("Viral upper respiratory infection {w} cough and {febrile}.",
      "Influenza swab positive, started oseltamivir.", "{cxr} {wo} {opacity}."),
     "influenza"),
    (("cough", "{sputum}"),
     ("Acute bronchitis {w} {sputum}.", "{cxr} clear.",
      "Treated {w} albuterol and a {days} day course of {abx_course}."),
     "acute bronchitis"),
    (("{sob}",),
     ("Postoperative {cxr} {w} {lobe} opacity, felt to be atelectasis.",
      "Incentive spirometry, {hypoxia} resolved.", "Repeat imaging {w} resolution."),
     "atelectasis"),
    (("cough", "{sob}"),
     ("Witnessed aspiration event at the nursing facility.",
      "{cxr} {w} {lobe} {opacity}, felt to be chemical pneumonitis, {abx} were not started.",
      "Speech and swallow evaluation, diet modified."),
     "aspiration pneumonitis"),
    (("pleuritic chest pain", "{sob}"),
     ("{ct} angiogram showed a {side} segmental {pe}.", "{hypoxia}, weaned to room air.",
      "Started on apixaban."),
     "{pe}"),
    (("cough",),
     ("{cxr} {w} {lobe} opacity, {ct} chest showed a spiculated mass.",
      "Bronchoscopy biopsy pending, referred to oncology."),
     "lung mass"),
)
OTHER_DIAGNOSES = (
    (("leg redness", "fever"),
     ("Admitted {w} left leg cellulitis.",
      "Treated {w} {iv} vancomycin and cefepime, erythema receding.", "{febrile}."),
     "cellulitis"),
    (("dysuria", "fever"),
     ("{uti} {w} pyuria, urine culture grew e coli.", "{leukocytosis}, {febrile}.",
      "Treated {w} ceftriaxone then oral cephalexin."),
     "{uti}"),
    (("chest pain",),
     ("Admitted for chest pain.", "Acute coronary syndrome {ro} {w} serial troponins."),
     "atypical chest pain"),
    (("black stools",),
     ("Admitted {w} melena.", "EGD showed a duodenal ulcer, started on pantoprazole {bid}."),
     "upper GI bleed"),
    (("fall",),
     ("Admitted after a syncopal episode.",
      "Telemetry unremarkable, orthostatic vital signs positive."),
     "syncope"),
    (("nausea and vomiting",),
     ("Admitted {w} diabetic ketoacidosis.", "Anion gap closed on an insulin drip."),
     "DKA"),
    (("palpitations",),
     ("{afib} {w} rapid ventricular response.",
      "Rate controlled {w} metoprolol, started apixaban."),
     "{afib} with RVR"),
)
NEGATIONS = ("{cxr} {wo} evidence of {X}.", "Negative for {X}.", "{X} {ro}.")
HISTORY = ("Remote {hx} {X}.", "Family {hx} {X}.", "Prior admission {w} {X} in {year}.",
           "{hx} {X} requiring intubation in {year}.")
# Discharge diagnoses that name no condition: hard positives end on one of these, and so do
# many notes of other diagnoses (DISCHARGE_VAGUE of them).
VAGUE_DIAGNOSES = ("lower respiratory tract infection", "sepsis",
                   "acute hypoxic respiratory failure", "cough and fever", "{sob}")
DISCHARGE_VAGUE = 0.4
# Sentences a pneumonia note may share with a mimic: pneumonia after influenza, on COPD, after
# aspiration (aspiration pneumonia, where the mimic is aspiration pneumonitis).
COMPLICATED_BY = ("Influenza swab positive, started oseltamivir.", "{copd} on home oxygen.",
                  "Witnessed aspiration event at the nursing facility.",
                  "{cxr} {w} small bilateral effusions.")
HEDGES = ("Possible early {pna} on {cxr}, treated empirically {w} {abx_course}.",
          "Cannot exclude {pna}, {abx} were continued.",
          "Initial concern for {pna}, however {cxr} was clear and {abx} were stopped.")
FILLERS = (
    "Vital signs stable.", "Tolerating a regular diet.", "Ambulating independently {w} PT.",
    "Home medications were resumed.", "{fu} {w} {pcp} in 1 week.",
    "Labs notable for mild hyponatremia.", "Seen by case management.",
    "{pt} remained hemodynamically stable.", "Glucose controlled {w} sliding scale insulin.",
    "Code status full code.", "No acute events overnight.", "Pain controlled {w} acetaminophen.",
    "DVT prophylaxis {w} heparin.", "Seen in the {ed} and admitted to medicine.",
    "Pneumococcal and influenza vaccines up to date.", "Physical therapy recommended rehab.",
)
COMORBIDITIES = ("{htn}", "{dm}", "{ckd}", "{afib}", "hyperlipidemia", "obesity", "{copd}", "{chf}")
# Labels taken from billing codes or chart review disagree with the note text now and then.
LABEL_NOISE = 0.07
HARD_POSITIVE = 0.4  # share of positive notes that name no diagnosis, only findings
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(
    sentence: str, style: NoteStyle, rng: np.random.Generator, extra: Mapping[str, str]
) -> str:
    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key in extra:
            return _fill(extra[key], style, rng, {})
        if key in NUMBERS:
            return _fill(NUMBERS[key](rng), style, rng, {})
        if key in WORDING:
            variants = WORDING[key]
            own = rng.uniform() < SITE_WORDING
            pick = style.preferred(key) if own else int(rng.integers(len(variants)))
            return _fill(variants[pick], style, rng, {})
        spelled, short = TERMS[key]
        return short if rng.uniform() < style.abbreviation else spelled

    return _PLACEHOLDER.sub(fill, sentence)


def _render(sentence: str, style: NoteStyle, rng: np.random.Generator, **extra: str) -> str:
    """Fill ``{term}`` placeholders in the site's style; capitalise the sentence."""
    text = _fill(sentence, style, rng, extra)
    return text[:1].upper() + text[1:]


def _typos(text: str, rate: float, rng: np.random.Generator) -> str:
    if rate <= 0:
        return text
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) > 3 and word.isalpha() and rng.uniform() < rate:
            j = int(rng.integers(1, len(word) - 1))
            kind = rng.integers(3)
            if kind == 0:
                word = word[: j - 1] + word[j] + word[j - 1] + word[j + 1 :]  # swap
            elif kind == 1:
                word = word[:j] + word[j + 1 :]  # drop
            else:
                word = word[:j] + word[j] + word[j:]  # double
            words[i] = word
    return " ".join(words)


def _pick(rng: np.random.Generator, items: Sequence[Any], k: int = 1) -> list[Any]:
    k = max(0, min(k, len(items)))
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def synthetic_note(
    label: int, num_classes: int, style: NoteStyle, rng: np.random.Generator
) -> str:
    """A discharge-summary-like note whose class is the primary diagnosis.

    Class k >= 1 is condition ``CONDITIONS[k-1]`` (pneumonia, heart failure, COPD); class 0
    is anything else: conditions that are not classes (in the binary task heart failure and
    COPD), respiratory mimics (influenza, bronchitis, atelectasis, aspiration pneumonitis,
    pulmonary embolism, a lung mass) and other admissions. See the section comment above for
    what makes the classes overlap.
    """
    classes = CONDITIONS[: num_classes - 1]

    def r(sentence: str, **extra: str) -> str:
        return _render(sentence, style, rng, **extra)

    course: list[str] = []
    if label >= 1:
        cond = classes[label - 1]
        complaint = _pick(rng, cond.complaint)[0]
        if rng.uniform() < HARD_POSITIVE:  # findings only, the diagnosis never named
            course += _pick(rng, cond.support, int(rng.integers(2, 5)))
            diagnosis = _pick(rng, cond.vague)[0]
            if cond.name == "pna" and rng.uniform() < 0.2:
                course.append(_pick(rng, HEDGES[:2])[0])
        else:
            course += _pick(rng, cond.strong, int(rng.integers(1, 3)))
            course += _pick(rng, cond.support, int(rng.integers(0, 3)))
            diagnosis = _pick(rng, cond.diagnosis)[0]
        if cond.name == "pna" and rng.uniform() < 0.3:
            course.append(_pick(rng, COMPLICATED_BY)[0])
        others = [c for c in CONDITIONS if c is not cond]
        negated = 0.35
    else:
        non_class = CONDITIONS[num_classes - 1 :]
        kind = rng.uniform()
        if non_class and kind < 0.2:
            cond = non_class[int(rng.integers(len(non_class)))]
            complaint = _pick(rng, cond.complaint)[0]
            course += _pick(rng, cond.strong, int(rng.integers(1, 4)))
            course += _pick(rng, cond.support, 1)
            diagnosis = _pick(rng, cond.diagnosis)[0]
        elif classes and kind < 0.35:  # an unexplained illness: findings, no diagnosis named
            cond = classes[int(rng.integers(len(classes)))]
            complaint = _pick(rng, cond.complaint)[0]
            course += _pick(rng, cond.support, int(rng.integers(1, 4)))
            diagnosis = _pick(rng, VAGUE_DIAGNOSES)[0]
        else:
            pool = RESPIRATORY_MIMICS if kind < 0.65 else OTHER_DIAGNOSES
            complaints, sentences, diagnosis = pool[int(rng.integers(len(pool)))]
            complaint = _pick(rng, complaints)[0]
            course += _pick(rng, sentences, int(rng.integers(len(sentences) - 1,
                                                             len(sentences) + 1)))
        others = list(classes)
        negated = 0.45
        if rng.uniform() < DISCHARGE_VAGUE:
            diagnosis = _pick(rng, VAGUE_DIAGNOSES)[0]
        if classes and rng.uniform() < 0.55:  # findings of a class without the condition
            cond = classes[int(rng.integers(len(classes)))]
            course += _pick(rng, cond.support, int(rng.integers(1, 4)))
        if classes and classes[0].name == "pna" and rng.uniform() < 0.12:
            course.append(_pick(rng, HEDGES)[0])
    for other in others:  # negated mentions: a bag of words sees the condition's name here too
        if rng.uniform() < negated:
            phrasing = (NEGATIONS[style.negation] if rng.uniform() < 0.7
                        else _pick(rng, NEGATIONS)[0])
            course.append(r(phrasing, X="{" + other.name + "}"))
    if rng.uniform() < 0.2:
        course.append(r(_pick(rng, HISTORY)[0], X="{" + _pick(rng, CONDITIONS)[0].name + "}"))
    course = [r(s) for s in course]
    # Routine sentences fill the hospital course up to a length set by the site's style, not
    # by the diagnosis: note length must not give the label away.
    low, high = style.filler
    target = 40 + 5 * int(rng.integers(low, high + 1))
    words = sum(len(s.split()) for s in course)
    for filler in _pick(rng, FILLERS, len(FILLERS)):
        if words >= target:
            break
        course.append(r(filler))
        words += len(course[-1].split())
    order = rng.permutation(len(course))
    course = [course[i] for i in order]
    comorbidities = _pick(rng, COMORBIDITIES, 2)
    intro = r("{pt} is a {age} {yo} {sex} {w} {hx} {a} and {b} who presents {w} {c}.",
              a=comorbidities[0], b=comorbidities[1], c=complaint)
    dx = r(diagnosis)
    if style.template == 0:
        text = (f"CHIEF COMPLAINT: {r(complaint)}\nHISTORY OF PRESENT ILLNESS: {intro}\n"
                f"HOSPITAL COURSE: {' '.join(course)}\n"
                f"DISCHARGE DIAGNOSES: 1. {dx} 2. {r(comorbidities[0])}\n"
                f"DISCHARGE CONDITION: stable.")
    elif style.template == 1:
        bullets = "\n".join(f"- {s}" for s in course)
        text = (f"Chief complaint - {r(complaint)}\n{intro}\nBrief hospital course -\n{bullets}\n"
                f"Dx - {dx}\nDispo - home")
    else:
        text = f"{intro} {' '.join(course)} Discharged home in stable condition, dx {dx}."
    return _typos(text, style.typo_rate, rng)

"""lm-evaluation-harness's own task configs (hellaswag, arc_easy, winogrande, lambada_openai) over local documents:
task YAML files that `include` the harness's and point dataset_path at a local .jsonl (no Hub). Used by the tests."""

import json
import os

import lm_eval

TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")

HELLASWAG = [  # rowanz/Hub rows exercising the harness's preprocessing, and contexts longer than a 64-token block
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the "
     "window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
                 "supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow "
                 "on his car."]},
    {"ind": 24, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny "
     "spot.  [step] Tomatoes need 8 hours of light.", "ctx_b": "", "label": "0",
     "endings": ["[substeps] Water them  daily.", "Plant them in a cave [title] forever.", " Buy a dog. ",
                 "Sing to them [step] loudly."]},
    {"ind": 7, "activity_label": "Baking cookies", "ctx_a": "A woman mixes flour.", "ctx_b": "SHE adds Eggs.",
     "label": "2", "endings": ["She bakes them.", "The oven explodes.", "They eat it all.", "Cafe time 42."]},
    {"ind": 9, "activity_label": "Running", "ctx_a": "A man runs.", "ctx_b": "he stops", "label": 1,
     "endings": ["now.", "and rests for a while.", "x", "because the road ends at a wide river."]},
    {"ind": 11, "activity_label": "Chess", "ctx_a": "Two people play chess.", "ctx_b": "one wins", "label": 0,
     "endings": ["quickly.", "slowly and carefully.", "the game.", "nothing."]},
]
ARC = [  # 3 to 5 choices: chance is averaged over the documents
    {"id": "a1", "question": "Which of these is a source of light?", "answerKey": "B",
     "choices": {"text": ["a rock", "the sun", "a shadow", "water"], "label": ["A", "B", "C", "D"]}},
    {"id": "a2", "question": "What do plants need to grow?", "answerKey": "3",
     "choices": {"text": ["darkness", "salt", "sunlight and water"], "label": ["1", "2", "3"]}},
    {"id": "a3", "question": "Ice melting is an example of", "answerKey": "A",
     "choices": {"text": ["a change of state", "a chemical reaction", "erosion", "gravity", "magnetism"],
                 "label": ["A", "B", "C", "D", "E"]}},
    {"id": "a4", "question": "Which animal lays eggs?", "answerKey": "C",
     "choices": {"text": ["a dog", "a cat", "a hen", "a cow"], "label": ["A", "B", "C", "D"]}},
]
WINOGRANDE = [  # the blank splits the sentence: each option completes the context, the rest is scored
    {"sentence": "The trophy does not fit in the suitcase because the _ is too big.", "option1": "trophy",
     "option2": "suitcase", "answer": "1"},
    {"sentence": "Sarah lent Maria money because _ was short of cash that week.", "option1": "Sarah",
     "option2": "Maria", "answer": "2"},
    {"sentence": "The cup fell on the floor and the _ broke into many pieces.", "option1": "cup",
     "option2": "floor", "answer": "1"},
]
LAMBADA = [{"text": "the king went to the hall and the lords followed the king"},
           {"text": "she opened the door and saw the garden where her mother grew roses"},
           {"text": "in the morning the cat sat by the window watching the birds"}]
CONFIGS = {  # name: (the harness's file, its split holding the documents, the documents)
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", HELLASWAG),
    "arc_easy": ("arc/arc_easy.yaml", "test", ARC),
    "winogrande": ("winogrande/default.yaml", "validation", WINOGRANDE),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test", LAMBADA),
}


def write_tasks(folder) -> list[str]:
    """The four tasks' .jsonl data and .yaml configs in `folder`: the harness's own task, local documents."""
    paths = []
    for name, (config, split, docs) in CONFIGS.items():
        data, path = os.path.join(folder, f"{name}.jsonl"), os.path.join(folder, f"{name}.yaml")
        with open(data, "w") as fh:
            fh.writelines(json.dumps(doc) + "\n" for doc in docs)
        with open(path, "w") as fh:  # JSON is YAML
            json.dump({"include": os.path.join(TASKS, config), "task": name, "dataset_path": "json",
                       "dataset_name": None, "dataset_kwargs": {"data_files": {split: data}}, "training_split": None,
                       "validation_split": split if split == "validation" else None}, fh)
        paths.append(path)
    return paths

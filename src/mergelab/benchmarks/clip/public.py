"""The public protocol as data: class names and prompt templates of the 8 tasks, and where each
dataset comes from and how its folder is laid out (``docs/clip.md``)."""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------
# class names and prompt templates: the public ones, as data. Source: mlfoundations/task_vectors
# (src/datasets/templates.py and each dataset's ``classnames``), identical in the official TSV code
# (AntoAndGar/task_singular_vectors, src/datasets/). GTSRB's names are CLIP's (openai/CLIP,
# data/prompts.md). Cars reads its names from the dataset (cars_meta.mat); SUN397 derives them
# from ClassName.txt by the public rule (:func:`sun397_public_classes`).
# ----------------------------------------------------------------------------------------------
DIGITS = [str(d) for d in range(10)]

DTD_CLASSES = [
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
    "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
    "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
    "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
]
"""DTD's 47 texture folders (sorted); the class name is the folder name (public: the same)."""

EUROSAT_CLASSES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}
"""EuroSAT RGB folder name -> the public class name (task_vectors' ``ours_to_open_ai``); folders sorted =
label order."""

GTSRB_CLASSES = [
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning", "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning", "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning", "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory", "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory", "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
]
"""GTSRB's 43 public class names (CLIP's descriptions, spelling kept), indexed by the class id (folder
``000NN`` / ``ClassId``)."""

RESISC45_FOLDERS = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
    "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
    "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship",
    "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
]
"""NWPU-RESISC45's 45 scene folders (sorted); the class name is the folder with spaces (public: the same)."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "Cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
             "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."),
    "DTD": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."),
    "EuroSAT": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "GTSRB": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "MNIST": ('a photo of the number: "{}".',),
    "RESISC45": tuple(f"{view} of {article}{{}}." for article in ("", "a ", "the ")
                      for view in ("satellite imagery", "aerial imagery", "satellite photo", "aerial photo",
                                   "satellite view", "aerial view")),
    "SUN397": ("a photo of a {}.", "a photo of the {}."),
    "SVHN": ('a photo of the number: "{}".',),
}
"""The public prompt templates per task (8, 8, 3, 3, 1, 18, 2, 1 of them, in the public order): each class
embedding is the mean over templates of the normalized text embedding."""

OBTAIN = {
    "Cars": "Stanford Cars is no longer downloadable from its original site; torchvision documents the "
            "expected files (torchvision.datasets.StanfordCars). Community mirrors (e.g. on Kaggle) carry "
            "the same devkit and image folders.",
    "DTD": "torchvision.datasets.DTD(root=<data root>, download=True) writes it (or download dtd-r1.0.1.tar.gz "
           "from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and extract it into <data root>/dtd/).",
    "EuroSAT": "torchvision.datasets.EuroSAT(root=<data root>, download=True) writes it (RGB version, 27,000 "
               "images).",
    "GTSRB": "torchvision.datasets.GTSRB(root=<data root>, split='train'|'test', download=True) writes it.",
    "MNIST": "torchvision.datasets.MNIST(root=<data root>, train=True|False, download=True) writes it.",
    "RESISC45": "download NWPU-RESISC45 (e.g. from https://www.tensorflow.org/datasets/catalog/resisc45 or its "
                "mirrors) and extract it so that <data root>/resisc45/NWPU-RESISC45/<class>/<class>_NNN.jpg "
                "exist, and put the public split files resisc45-{train,val,test}.txt (from 'In-domain "
                "representation learning for remote sensing', google-research/remote_sensing_representations; "
                "torchgeo's RESISC45 dataset downloads the same files) in <data root>/resisc45/.",
    "SUN397": "torchvision.datasets.SUN397(root=<data root>, download=True) writes it; add Training_01.txt and "
              "Testing_01.txt (the official partition 1) from "
              "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip to <data root>/SUN397/.",
    "SVHN": "torchvision.datasets.SVHN(root=<data root>/svhn, split='train'|'test', download=True) writes it.",
}

LAYOUT = {
    "Cars": "<root>/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
            "cars_test/, cars_test_annos_withlabels.mat}",
    "DTD": "<root>/dtd/dtd/images/<class>/*.jpg and <root>/dtd/dtd/labels/{train1,val1,test1}.txt",
    "EuroSAT": "<root>/eurosat/2750/<Class>/*.jpg (10 class folders: AnnualCrop ... SeaLake), or the public "
               "benchmark's prepared split <root>/EuroSAT_splits/{train,val,test}/<Class>/*.jpg",
    "GTSRB": "<root>/gtsrb/GTSRB/Training/000NN/*.ppm, <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm and "
             "<root>/gtsrb/GT-final_test.csv",
    "MNIST": "<root>/MNIST/raw/{train,t10k}-images-idx3-ubyte and <root>/MNIST/raw/{train,t10k}-labels-idx1-ubyte",
    "RESISC45": "<root>/resisc45/NWPU-RESISC45/<class>/*.jpg (45 class folders) and "
                "<root>/resisc45/resisc45-{train,val,test}.txt",
    "SUN397": "<root>/SUN397/ClassName.txt, <root>/SUN397/<letter>/<class>[/<sub>]/sun_*.jpg and "
              "<root>/SUN397/{Training_01,Testing_01}.txt",
    "SVHN": "<root>/svhn/{train,test}_32x32.mat",
}

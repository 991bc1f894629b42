"""ood_jax: out-of-distribution detection and calibration under dataset shift, in JAX/Flax."""

import pathlib
import re

import setuptools

HERE = pathlib.Path(__file__).resolve().parent
# The version lives in ood_jax/__init__.py (`ood_jax.__version__`); read, not imported (that would need jax).
VERSION = re.search(r"^__version__ = '([^']+)'$", (HERE / 'ood_jax' / '__init__.py').read_text(encoding='utf-8'),
                    flags=re.M).group(1)

# The library core (layers, losses, scores, metrics, calibration, models, methods, detectors):
# `pip install ood_jax` in any Flax project. Everything else is an extra (ood_jax/_extras.py says
# which module needs which, and importing one without its extra says what to install).
# JAX releases ood_jax works with; the accelerator extras below resolve their JAX build within the same range.
JAX_VERSIONS = '>=0.6,<0.13'
INSTALL_REQUIRES = [
    f'jax{JAX_VERSIONS}',
    'flax>=0.11,<0.14',
    'optax>=0.2.4,<0.3',
    'chex>=0.1.89,<0.2',
    'numpy>=1.26,<3',
]

# The trainer, the evaluator and TFDS data, less TensorFlow: what a runtime that ships `tensorflow`
# (Colab) lacks. None of these depends on TensorFlow (TFDS leaves the choice of build to the user).
_TRAINER = [
    'tensorflow-datasets>=4.9.7,<5',
    'orbax-checkpoint>=0.11,<0.13',
    'clu>=0.0.12,<0.1',  # metric writers: TensorBoard + logging
    'ml_collections>=1.0,<2',
    'absl-py>=2.1,<3',
    'pillow>=10,<14',  # image folders, OOD sets and outliers resized on the host
    # TFDS's dataset builders import it through etils, whose 1.15 release no longer installs it.
    'importlib_resources>=6',
]
# TFDS needs TensorFlow to read datasets; the CPU build keeps it off the accelerators. Never installed
# over an existing `tensorflow` (setup.py cannot see what is installed when a wheel is built, so the
# 'colab' extra is the same set without it).
_TENSORFLOW = [
    'tensorflow-cpu>=2.16,<2.22',
    'tensorboard>=2.16,<2.22',  # clu's summary writer
]

EXTRAS_REQUIRE = {
    'train': _TRAINER + _TENSORFLOW,
    'colab': _TRAINER,  # Colab (and any environment with `tensorflow`): train without tensorflow-cpu
    'plots': ['matplotlib>=3.8,<4'],  # ood_jax.plots
    'digits': [
        'scikit-learn>=1.4,<2',  # the offline digits benchmark ships inside scikit-learn
        'pillow>=10,<14',  # scikit-learn's sample photos (the far-OOD set)
    ],
    # The documentation site (docs/, built by .ci/run: sphinx-build -W docs docs/_build/html); autodoc imports
    # every module, so build it where the 'all' extra is installed too.
    'docs': [
        'sphinx>=7.2,<10',
        'myst-parser>=3,<6',
        'sphinx-book-theme>=1.1,<2',
    ],
    # JAX's accelerator builds, resolved together with the rest (`pip install -e '.[all,cuda12]'`): one resolver
    # keeps jax, jaxlib and the plugin within ood_jax's range, where a later `pip install -U "jax[cuda12]"` would
    # not. jax offers the cuda13 extra from 0.7.0 on.
    'cuda12': [f'jax[cuda12]{JAX_VERSIONS}'],
    'cuda13': [f'jax[cuda13]{JAX_VERSIONS},>=0.7'],
    'tpu': [f'jax[tpu]{JAX_VERSIONS}'],
    'test': [
        'pytest>=8,<10',
        'pytest-xdist>=3.5,<4',
        'hypothesis>=6.100,<7',  # property-based tests (tests/test_fuzz.py)
        'ruff>=0.8,<1',  # the style check (ruff.toml), run by CI
        'scipy>=1.11,<2',
        'nbclient>=0.9,<1',  # runs colab/ notebooks in smoke mode
        'nbformat>=5.9,<6',
        'packaging>=23',  # tests/test_install.py reads requirement markers
        'ipykernel>=6.25,<8',
        'build>=1.2,<2',  # tests/test_install.py builds the wheel and the sdist
        'twine>=5,<8',  # ... and checks them as PyPI would
    ],
}
# Everything the CLI, the benchmarks and the figures use (the README installs it with the test tools).
EXTRAS_REQUIRE['all'] = list(dict.fromkeys(
    EXTRAS_REQUIRE['train'] + EXTRAS_REQUIRE['plots'] + EXTRAS_REQUIRE['digits']))

# The one place for the repository's address (placeholder: the public URL, once it has one). docs/conf.py reads it;
# the notebook's OOD_JAX_REPO and the README's Colab badge must name the same (tests/test_notebook.py).
URL = 'https://github.com/ood-jax/ood_jax'


def _long_description() -> str:
  """README.md with its relative links made absolute, so that they work on PyPI too."""
  readme = (HERE / 'README.md').read_text(encoding='utf-8')
  return re.sub(r'(\]\()(?!https?://|#)([^)\s]+)\)',
                lambda m: f'{m.group(1)}{URL}/blob/main/{m.group(2)})', readme)


setuptools.setup(
    name='ood_jax',
    version=VERSION,
    description='Out-of-distribution detection and calibration under dataset shift in JAX/Flax.',
    long_description=_long_description(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['ood_jax', 'ood_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    url=URL,
    project_urls={
        'Source': URL,
        'Changelog': f'{URL}/blob/main/CHANGELOG.md',
        'Documentation': f'{URL}/tree/main/docs',
    },
    license='Apache-2.0',
)

"sd_intro.training: the one training loop, its checkpoints, resume checks, run lock, EMA and LoRA saver; and the trainers on it give the results of the loops they replaced."
import copy, json, os, subprocess, sys, warnings
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

from sd_intro.training import (EMA, LOCK_NAME, changed_settings, checkpoints, load_checkpoint, load_state, refuse_resume,
                               resumable, run_lock, save_checkpoint, save_state, train_loop)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / 'fixtures' / 'training'


pytestmark = pytest.mark.usefixtures('one_thread')   # the stored results were made on one thread (float sums depend on it)


def same_tensors(a: dict, b: dict) -> bool: return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the loop ------------------------------------------------------------------------------------------------

def test_the_loop_checkpoints_every_n_steps_and_where_it_stops():
    saved, order = [], []
    losses = train_loop(lambda i: float(i), 0, 5, total=7, every=2, checkpoint=lambda d: (saved.append(d), order.append(('ck', d))),
                        log=lambda d, l: order.append(('log', d)), after=lambda d, l: order.append(('after', d)))
    assert losses == [0.0, 1.0, 2.0, 3.0, 4.0] and saved == [2, 4, 5]
    assert order[:4] == [('log', 1), ('after', 1), ('log', 2), ('ck', 2)]           # log, checkpoint, then after
    saved = []
    train_loop(lambda i: 1.0, 5, 7, every=2, checkpoint=saved.append, final=False)
    assert saved == [6]                                                            # not at the run's last step


def test_the_loop_stops_on_a_loss_that_is_not_finite_naming_the_step_and_the_fix():
    saved = []
    with pytest.raises(FloatingPointError, match=r'the loss became inf at step 3: use lr=1e-5'):
        train_loop(lambda i: float('inf') if i == 2 else 1.0, 0, 5, every=1, checkpoint=saved.append, advice='use lr=1e-5')
    assert saved == [1, 2]                                                         # no checkpoint of the bad step
    with pytest.raises(ValueError, match='start=3, stop=2'): train_loop(lambda i: 1.0, 3, 2)


def _linear_run(stop, state=None, ema_decay=0.9):
    "A small regression on the loop, with an EMA; resumable from the state its checkpoints keep."
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1); opt = torch.optim.AdamW(net.parameters(), 0.05); ema = EMA(net, ema_decay)
    x = torch.randn(16, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    start, kept = 0, {}
    if state:
        net.load_state_dict(state['net']); opt.load_state_dict(state['opt']); ema.load(state['ema'], state['step'])
        start = state['step']
    def step(i):
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); ema.update(net, i)
        return loss.item()
    def checkpoint(done):
        kept.update(net=copy.deepcopy(net.state_dict()), opt=copy.deepcopy(opt.state_dict()),
                    ema=copy.deepcopy(ema.model.state_dict()), step=done)
    losses = train_loop(step, start, stop, total=8, every=3, checkpoint=checkpoint)
    return net, ema, losses, kept


def test_a_run_stopped_and_resumed_on_the_loop_ends_as_an_unbroken_one_to_the_bit():
    net, ema, losses, _ = _linear_run(8)
    _, _, first, kept = _linear_run(5)
    assert kept['step'] == 5
    net2, ema2, rest, _ = _linear_run(8, kept)
    assert first + rest == losses
    assert same_tensors(net.state_dict(), net2.state_dict()) and same_tensors(ema.model.state_dict(), ema2.model.state_dict())


# ---- EMA: diffusers' EMAModel with the warm-up the embedded and flow models were trained with ------------------

class OldEMA:
    "The EMA class embedded.py had before the training loop (for comparison)."
    def __init__(self, model, decay=0.999): self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)
    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()): e.lerp_(p, 1 - d)


def test_ema_runs_diffusers_emamodel_with_the_old_warm_up_and_agrees_with_the_old_class():
    from diffusers.training_utils import EMAModel
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    new, old = EMA(net, 0.95), OldEMA(net, 0.95)
    assert isinstance(new.ema, EMAModel)
    assert [new.get_decay(s + 1) for s in (0, 1, 50)] == [min(0.95, (1 + s) / (10 + s)) for s in (0, 1, 50)]
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters(): p.add_(torch.randn_like(p) * 0.1)
        new.update(net, step); old.update(net, step)
    a, b = new.model.state_dict(), old.model.state_dict()
    # the same average; diffusers computes s - (1-d)(s - p) where the old class took lerp: they differ by rounding only
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert all(s is p for s, p in zip(new.ema.shadow_params, new.model.parameters()))   # the copy is the average


# ---- checkpoints, state files, resume checks ----------------------------------------------------------------

def _opt(step):
    return dict(optimizer={'state': {0: {'step': torch.tensor(float(step))}}, 'param_groups': []}, lr_scheduler={'last_epoch': step})


def test_checkpoints_are_whole_or_absent_and_an_edited_one_is_passed_over_with_a_warning(tmp_path):
    for s in (1, 2, 3): save_checkpoint(tmp_path, s, dict(losses=[1.0] * s), {'w': torch.full((3,), float(s))}, None, _opt(s))
    assert [p.name for p in checkpoints(tmp_path)] == ['step-000003', 'step-000002']
    (tmp_path / 'checkpoints' / '.tmp-step-000004-1').mkdir()                     # a kill while writing: never resumed
    st = tmp_path / 'checkpoints' / 'step-000003' / 'state.json'
    st.write_text(json.dumps(dict(json.loads(st.read_text()), losses=[0.0] * 3)))
    with pytest.warns(UserWarning, match=r'step-000003: state.json was changed.*previous complete one, step-000002'):
        ck, (state, w, ema, opt) = resumable(tmp_path)
    assert state['step'] == 2 and torch.equal(w['w'], torch.full((3,), 2.0)) and ema is None
    st2 = tmp_path / 'checkpoints' / 'step-000002' / 'state.json'
    st2.write_text(st2.read_text().replace('"step": 2', '"step": 5'))
    with pytest.raises(ValueError, match='No checkpoint in .* can be resumed: start a new run elsewhere'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        resumable(tmp_path, fix='start a new run elsewhere')


def test_a_state_file_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / 'ran'
    class Evil:
        def __reduce__(self): return (open, (str(marker), 'w'))
    torch.save({'x': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(ValueError, match=r'evil.pt \(a test\) holds pickled objects.*delete it'):
        load_state(tmp_path / 'evil.pt', 'a test', 'delete it')
    assert not marker.exists()
    f = save_state(dict(w=torch.arange(3), step=2), tmp_path / 'ok.pt')
    assert load_state(f, '', 'x')['step'] == 2 and [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')] == []
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match=r'ok.pt is damaged or cut short.*delete it'): load_state(f, '', 'delete it')


def test_a_resume_with_changed_settings_names_each_change_and_the_fix():
    diff = changed_settings(dict(lr=1e-3, steps=10, rank=4), dict(lr=1e-4, steps=10, rank=4, seed=0), defaults=dict(seed=0))
    assert diff == {'lr': (1e-3, 1e-4)}
    with pytest.raises(ValueError, match=r"cannot resume from x: it was made with other settings .*'lr': \(0.001, 0.0001\).*same lr"):
        refuse_resume('from x', diff, 'use the same lr')
    refuse_resume('from x', {}, 'never said')


# ---- the run lock ----------------------------------------------------------------------------------------------

def test_a_held_folder_is_refused_naming_the_holder_and_a_killed_holders_lock_ends_with_it(tmp_path, lock_holder):
    out = tmp_path / 'run'
    pid = lock_holder.hold(out)
    with pytest.raises(RuntimeError, match=rf'{out} is in use by another training run \(process {pid} on .*choose another out folder'):
        with run_lock(out): pass
    lock_holder.kill(pid)
    with run_lock(out): (out / 'result.txt').write_text('mine')   # the OS released the killed run's lock
    assert (out / LOCK_NAME).exists() and not (out / (LOCK_NAME + '.json')).exists()
    with run_lock(out, hold=False): pass


def test_a_run_refused_before_writing_leaves_no_folder(tmp_path):
    out = tmp_path / 'new'
    with pytest.raises(KeyError), run_lock(out): raise KeyError('bad setting')
    assert not out.exists()


# ---- the trainers on the loop give the results of the loops they replaced -------------------------------------
# Stored by tests/fixtures/training: a tiny LoRA fine-tune and a textual inversion run on the code before the loop
# (one thread). On the machine that made them they are equal to the bit; elsewhere float rounding may differ slightly.

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    import sd_intro.finetune as ft
    return ft.write_shapes_folder(tmp_path_factory.mktemp('trdata') / 'creatures', n_new=4, n_old=2, seed=3)


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_finetune_on_the_loop_gives_the_stored_lora_of_the_old_loop(data, tmp_path):
    import sd_intro.finetune as ft
    r = ft.finetune(data, tmp_path / 'run', method='lora', rank=2, steps=2, batch_size=2, lr=1e-3, seed=1, checkpoint_every=1,
                    progress=False)
    got, want = load_file(str(r.saved / 'pytorch_lora_weights.safetensors')), load_file(str(FIXTURES / 'finetune_lora.safetensors'))
    assert _close(got, want)
    assert r.losses == pytest.approx(json.loads((FIXTURES / 'losses.json').read_text())['finetune_lora'], rel=1e-4)


def test_textual_inversion_on_the_loop_gives_the_stored_vector_of_the_old_loop(data):
    from sd_intro.inside import load_parts, textual_inversion
    inv = textual_inversion(load_parts(), data, steps=3, batch_size=4, seed=1)
    assert _close({'embedding': inv.embedding}, load_file(str(FIXTURES / 'inversion.safetensors')))
    assert inv.losses == pytest.approx(json.loads((FIXTURES / 'losses.json').read_text())['inversion'], rel=1e-4)

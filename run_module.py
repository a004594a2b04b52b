"""One training run, once its configs are built: setup (seed, device, data, model, the training
state, resumed when asked), train, the test report, the LR finder, and the lines each says."""

import dataclasses
import errno
import math
import os
import shlex
import sys
import time
import typing

import torch

import callback_module
import checkpoint_module
import data_module
import distributed_module
import files_module
import folder_module
import messages_module
import model_module
import optim_module
import process_module
import report_module
import state_module
import step_module
import tracker_module
import train_module
import utils
from callback_module import LRA


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What setup, train and report read beyond the modules' configs; each field but resume is the
    constant of its name in upper case."""

    model: str
    pretrained: str | None
    freeze: bool
    weights: str | None
    bf16: bool
    cuda_graphs: str
    class_weights: str | None  # the weights themselves come from the data (setup)
    tta: bool
    tracker: str | None
    dist_timeout: float  # read before the configs are built (init_distributed); checked here too
    resume: str | None  # RESUME's checkpoint ("auto": OUTPUT_DIR's, when there); None: a new run
    bf16_trial_steps: int  # a CPU run of this many steps or more first times bf16 against fp32

    def __post_init__(self) -> None:
        model_module.check_name(self.model)
        messages_module.check_fields(self, {"dist_timeout": (lambda t: t > 0, "seconds > 0")},
                                     {"cuda_graphs": step_module.CUDA_GRAPHS,
                                      "class_weights": train_module.CLASS_WEIGHTS,
                                      "tracker": (None, *tracker_module.TRACKERS)})
        tracker_module.check_installed(self.tracker)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run's settings: `constants` by name (after PRESET and the flags, paths made absolute:
    what each checkpoint records) and the configs built from them."""

    constants: dict[str, typing.Any]
    data: data_module.DataConfig
    optim: optim_module.OptimConfig
    lra: callback_module.LRAConfig
    fit: train_module.FitConfig
    run: RunConfig


@dataclasses.dataclass
class Run:
    """Everything setup builds for train and report."""

    device: torch.device
    data: data_module.Data
    state: state_module.TrainState
    fit: train_module.FitConfig  # the config's + setup's findings: precision, CUDA graph, processes
    rank: int
    account: utils.TimeAccount  # where the run's time goes
    tracker: tracker_module.Guarded | None = None

    @property
    def main_process(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class Outcome:
    """What one run gives its caller (the benchmarks): the exit status and the figures."""

    status: int
    history: list[dict] = dataclasses.field(default_factory=list)  # one metrics dict per epoch
    fit_seconds: float | None = None  # the whole of fit: training, validation, LRA and the files
    test: dict[str, typing.Any] | None = None  # evaluate's test-set result, with its "seconds"
    time: dict[str, float] | None = None  # the time account: seconds by part, "other" and "total"


WORKER_DIED = 4  # the exit status of a run whose worker process died (most often: short of memory)


FINAL_EVALUATION = "evaluating the trained model on the test set"  # report's stage


def resume_command(output_dir: str) -> str:
    """The command resuming output_dir's run (under torchrun, with as many processes: another number
    is refused)."""
    world, local = (int(os.environ.get(name, "1")) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    launcher = ["python"] if world == 1 else ["torchrun", f"--nproc_per_node={local}"] + (
        [f"--nnodes={world // local}", "..."] if world > local else ["--standalone"])
    return shlex.join([*launcher, "main.py", "--resume", "auto", "--output-dir", output_dir])


def interrupted_line(stage: str, output_dir: str) -> str:
    """The one line for a run interrupted outside the epochs (train and predict say their own)."""
    go_on = resume_command(output_dir)
    if stage == FINAL_EVALUATION:
        return ("Interrupted during the final evaluation; training is done and saved. To "
                f"evaluate, run: {go_on}")
    return f"Interrupted while {stage}."


def setup(config: Config, rank: int, world_size: int, local_rank: int, account: utils.TimeAccount,
          saved: dict[str, typing.Any] | None = None, new_run: bool = True) -> Run:
    """Seed, device, data, model and training state, resumed from saved (read_checkpoint's) if
    given. Raises ValueError or OSError for anything the user got wrong, before any training."""
    options, output_dir = config.run, config.fit.output_dir
    folder_module.check_outside_data(config.data, output_dir)  # before anything is read or written
    files_module.check_writable(output_dir)
    checkpoint_module.check_output_dir(output_dir)  # a run file that is a link: refused
    files_module.check_unlocked(output_dir, main_process=rank == 0)  # a live run there: refuse now
    if saved and len(saved["rng"]) != world_size:  # one random state per process of the run
        raise utils.CheckpointError(f"RESUME {options.resume} was saved by {len(saved['rng'])} "
                                    f"processes and this run has {world_size}: each one's batch "
                                    "(BATCH_SIZE), so the global batch and the schedule's steps, "
                                    "its share of the data and its random state belong to that "
                                    f"number; resume with {len(saved['rng'])} processes in all, "
                                    "or start a new run")
    weights = options.weights
    if saved is None and weights is not None and not os.path.isfile(weights):  # as get_model would
        raise utils.CheckpointError(f"WEIGHTS {weights} {utils.not_a_file(weights)}")
    if rank == 0 and saved is None and (warning := freeze_warning(options)):
        print(warning, file=sys.stderr)
    if rank == 0 and config.optim.warmup_epochs >= config.fit.epochs > 0:
        print(f"warning: {messages_module.flag_named('WARMUP_EPOCHS')} "
              f"{config.optim.warmup_epochs} covers every epoch of the run "
              f"({messages_module.flag_named('EPOCHS')} {config.fit.epochs}): the LR rises "
              "throughout and LRA never counts or cuts; set it below the epochs", file=sys.stderr)
    model_module.fetch_pretrained(options.model, options.pretrained)  # before any decoding
    utils.seed_everything(config.data.seed)
    device = utils.get_device(local_rank)
    cuda_graph = step_module.use_cuda_graph(options.cuda_graphs, device, world_size=world_size,
                                            compile=config.fit.compile, main_process=rank == 0,
                                            accumulate_steps=config.fit.accumulate_steps)
    torch.backends.cudnn.benchmark = True
    with account.timed("data"):
        data = data_module.get_data(config.data, device, rank=rank, world_size=world_size)
    with account.timed("model"):
        state = _make_state(config, data, device, lr_device=device if cuda_graph else None,
                            rank=rank, fresh=saved is None)
    if world_size > 1:
        utils.seed_everything(config.data.seed + rank)  # same initial weights, other augmentations
    total_steps = config.fit.epochs * len(data.train)
    with account.timed("precision"):
        # rank 0 measures; every rank takes its answer
        precision = distributed_module.broadcast(step_module.choose_precision(
            options.bf16, device, state.model, data.image_size,
            channels_last=config.data.channels_last,
            trial=saved is None and rank == 0 and total_steps >= options.bf16_trial_steps,
            recorded=saved and saved["precision"]))
    state.info = state_module.RunInfo(config.constants, data.classes, list(data.mean),
                                      list(data.std), data.image_size, data.resize_size, precision,
                                      started=saved["started"] if saved
                                      else checkpoint_module.timestamp(),
                                      tracker_run=saved.get("tracker_run") if saved else None)
    class_weights = (train_module.balanced_class_weights(data.class_counts, data.classes)
                     if options.class_weights == "balanced" else None)
    fit = dataclasses.replace(config.fit,
                              autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
                              cuda_graph=cuda_graph, world_size=world_size, main_process=rank == 0,
                              class_weights=class_weights)
    if rank == 0:
        checkpoint_module.check_room(output_dir, state, resuming=saved is not None)
    os.makedirs(output_dir, exist_ok=True)  # only now: bad input above leaves nothing behind
    # held until run_main ends (or the process dies)
    files_module.lock_folder(output_dir, main_process=rank == 0)
    if rank == 0:
        checkpoint_module.remove_partial_writes(output_dir)  # a killed run's half-written files
    if saved:
        checkpoint_module.resume(saved, options.resume, state, output_dir=output_dir, rank=rank,
                                 world_size=world_size)
        if config.lra.ask_epoch != saved["config"].get("ASK_EPOCH"):  # given anew: it replaces it
            state.lra.ask_anew(config.lra.ask_epoch)
    elif rank == 0 and new_run:  # the earlier run's files go to OUTPUT_DIR/previous/
        checkpoint_module.move_earlier_run(output_dir)
    tracker = None
    if options.tracker and rank == 0 and new_run:  # its run id goes into each checkpoint
        tracker = tracker_module.open_tracker(options.tracker, output_dir, state.info.started,
                                              state.info.tracker_run, config.constants)
        state.info.tracker_run = tracker.run_id
    return Run(device, data, state, fit, rank, account, tracker)


def freeze_warning(options: RunConfig) -> str | None:
    """The warning for FREEZE without PRETRAINED or WEIGHTS (only the head learns); else None."""
    if not options.freeze or options.pretrained is not None or options.weights is not None:
        return None
    return ("warning: --freeze true without --pretrained or --weights freezes a randomly "
            "initialised body, so only the head learns; add --pretrained default "
            "(with a torchvision --model such as resnet18) or --weights PATH "
            "(an earlier run's best_model.pth), or leave --freeze false")


def _make_state(config: Config, data: data_module.Data, device: torch.device,
                lr_device: torch.device | None, rank: int, fresh: bool) -> state_module.TrainState:
    """Model (on device), optimizer, schedule, Lookahead, EMA and LRA; fresh: a new run, from
    WEIGHTS (a resumed one loads its checkpoint). Schedule and Lookahead count optimizer steps
    (ACCUMULATE_STEPS batches each)."""
    options = config.run
    model = model_module.get_model(options.model, len(data.classes), freeze=options.freeze,
                                   weights=options.weights if fresh else None,
                                   sample_images=data.train.first_images,
                                   image_size=data.image_size, pretrained=options.pretrained)
    layout = torch.channels_last if config.data.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    optimizer = optim_module.make_optimizer(model, config.optim, lr_device=lr_device)
    steps = step_module.optimizer_steps(len(data.train), config.fit.accumulate_steps)  # an epoch's
    total_steps = config.fit.epochs * steps
    schedule = optim_module.make_schedule(optimizer, config.optim.schedule, config.optim.lr,
                                          total_steps, config.optim.warmup_epochs * steps)
    lookahead = optim_module.Lookahead(model, total_steps) if config.optim.lookahead else None
    ema = (optim_module.EMA(model, config.optim.ema_decay) if config.optim.ema_decay is not None
           else None)
    lra = LRA(config.lra, frozen=bool(model_module.frozen_parameters(model)),
              main_process=rank == 0, share=distributed_module.from_rank_0)
    return state_module.TrainState(model, optimizer, lra, schedule=schedule, lookahead=lookahead,
                                   ema=ema)


def train(config: Config, run: Run) -> Outcome:
    """fit, with Ctrl-C, SIGTERM, a non-finite loss, a failed write and a dead worker each made a
    message and an exit status; then the training curves, unless a write failed."""
    output_dir, accumulate = run.fit.output_dir, run.fit.accumulate_steps
    go_on = resume_command(output_dir)
    accumulation = f", {accumulate} to an optimizer step" if accumulate > 1 else ""
    if run.main_process:
        graphed = " (steps replayed from a CUDA graph)" if run.fit.cuda_graph else ""
        print(f"{config.run.model} on {run.device}{graphed} | "
              f"{messages_module.plural(len(run.data.train), 'batch', 'batches')} of "
              f"{config.data.batch_size} per epoch{accumulation} | {_data_path(run.data)} | "
              f"outputs in {messages_module.printable(os.path.abspath(output_dir))}")
        if run.fit.class_weights is not None:
            print(_class_weights_line(run.fit.class_weights, run.data.classes))
    started, outcome, message = time.perf_counter(), Outcome(0), None
    try:
        outcome.history = train_module.fit(run.state, run.data, run.fit, account=run.account,
                                           on_epoch=run.tracker.log_epoch if run.tracker else None)
        outcome.fit_seconds = time.perf_counter() - started
    except KeyboardInterrupt as interrupt:
        outcome.status = process_module.interrupt_status(interrupt)
        message = f"Interrupted. The last completed epoch is saved; to go on, run: {go_on}"
    except train_module.NonFiniteLoss as error:
        outcome.status = 1
        kept = (f"The best weights so far are in {output_dir}/{checkpoint_module.BEST_MODEL}"
                if run.state.lra.best_epoch is not None else "No epoch finished: no weights kept")
        message = f"error: {error}. {kept}; try a lower LR."
    except OSError as error:  # a full disk, say: files written whole before it stay
        fix = "free the space" if error.errno == errno.ENOSPC else "fix the disk"
        outcome.status, message = 3, f"error: {error}; {fix}, then go on with: {go_on}"
    except process_module.WorkerDied as error:  # a DataLoader worker died (OOM killer, say)
        outcome.status, message = WORKER_DIED, f"error: {error}, then go on with: {go_on}"
    if run.main_process and run.state.history and outcome.status != 3:
        try:
            with run.account.timed("reports"):
                report_module.plot_training_curves(run.state.history,
                                                   os.path.join(output_dir, report_module.CURVES))
        except OSError as error:
            if outcome.status in (0, 1):  # a stop's own message outranks the curves
                outcome.status, message = 3, f"error: {error}"
    if message:  # under torchrun: rank 0 prints it, and every process ends with its status
        outcome.status = distributed_module.end_together(outcome.status, message)
    return outcome


def _class_weights_line(weights: tuple[float, ...], classes: list[str]) -> str:
    """The line saying the training loss is weighted: the least and greatest weight, and classes."""
    low, high = (min(range(len(weights)), key=weights.__getitem__),
                 max(range(len(weights)), key=weights.__getitem__))
    spread = (f"{weights[low]:.3g} for every class (a balanced split)"
              if weights[low] == weights[high]
              else f"{weights[low]:.3g} ({classes[low]}) to {weights[high]:.3g} ({classes[high]})")
    return f"class weights (CLASS_WEIGHTS balanced, the training loss only): {spread}"


def _data_path(data: data_module.Data) -> str:
    """Where the training batches come from, in words."""
    if data.resident:
        return "data resident on the device"
    return ("data streamed from the decoded-image cache" if data.cache_file
            else "data streamed by DataLoader workers")


def report(config: Config, run: Run) -> dict[str, typing.Any]:
    """Evaluate the best model (or its EMA) on the test set; print accuracy and each class's recall,
    write the test report, confusion matrix and most confident mistakes; return the figures."""
    data, started, tta = run.data, time.perf_counter(), config.run.tta
    with run.account.timed("final evaluation"):
        result = train_module.evaluate(run.state.evaluated_model, data.test,
                                       autocast_dtype=run.fit.autocast_dtype, tta=tta,
                                       num_classes=len(data.classes), collect=True)
    result["seconds"] = time.perf_counter() - started
    if not run.main_process:
        return result
    split = "validation" if data.test_is_val else "test"
    which = {"validation": "Validation accuracy (no test split)", "test": "Test accuracy"}[split]
    print(f"{which}: {100 * result['acc']:.2f}% (loss {result['loss']:.4f}"
          f"{', with test-time augmentation' if tta else ''}; {result['seconds']:.1f} s)")
    print("Recall of each class (the share of its images called it):")
    for name, recall in zip(data.classes, result["per_class"]):
        print(f"  {name:>12}: {100 * recall:6.2f}%")
    warning = chance_warning(result, len(data.classes), run.state.history)
    if warning:
        print(warning)
    with run.account.timed("reports"):
        report_module.write_test_outputs(result, data.classes, data.mean, data.std,
                                         run.fit.output_dir, split)
    if run.tracker:
        run.tracker.log_test(result, data.classes, step=len(run.state.history))
        # the run's files but the checkpoint, which only a resume reads
        paths = [os.path.join(run.fit.output_dir, name) for name in checkpoint_module.TRAINING_FILES
                 if name != checkpoint_module.CHECKPOINT]
        run.tracker.log_files([path for path in paths if os.path.isfile(path)])
        run.tracker.close()
    return result


FEW_EPOCHS = 5  # a run of fewer that learnt nothing needs more epochs before a lower LR


def chance_warning(result: dict[str, typing.Any], num_classes: int,
                   history: list[dict]) -> str | None:
    """A line with the likely cause when the final evaluation is at chance (accuracy within two
    standard errors of 1/classes, loss within 1% of ln classes: the same output for every image),
    else None."""
    chance, images = 1 / num_classes, int(result["confusion"].sum())
    if (abs(result["acc"] - chance) > 2 * math.sqrt(chance * (1 - chance) / images)
            or abs(result["loss"] - math.log(num_classes)) > 0.01 * math.log(num_classes)):
        return None
    trained = max((row["train_acc"] for row in history), default=0.0)
    cause = ((f"training accuracy reached {100 * trained:.0f}%, so in eval mode the model gives "
              "every image the same output (BatchNorm statistics behind the weights, as with few "
              "steps an epoch): try --pretrained default, a smaller --batch-size or --model cnn")
             if trained > 2 * chance
             else (f"nothing was learnt in {messages_module.plural(len(history), 'epoch')}: train "
                   f"longer (--epochs {FEW_EPOCHS * 2} or more)") if len(history) < FEW_EPOCHS
             else "nothing was learnt: try a lower --lr, or --find-lr's suggestion")
    return (f"warning: the final accuracy {100 * result['acc']:.1f}% is chance (1/{num_classes}) "
            f"and the loss {result['loss']:.4f} is ln {num_classes}; {cause}")


def find_lr(config: Config, run: Run, argv: list[str]) -> int:
    """LR range test, not training: lr_finder.png, a suggested LR and the command to train at it."""
    try:
        lrs, losses, suggestion = optim_module.find_lr(
            run.state.model, run.data.train, run.state.optimizer,
            train_module.training_loss(run.fit).to(run.device),
            autocast_dtype=run.fit.autocast_dtype)
    except ValueError as error:  # a loss not finite from the first step: no curve to draw
        weights = config.run.weights
        check = f"; check {messages_module.flag_named('WEIGHTS')} {weights}" if weights else ""
        return distributed_module.end_together(
            1, f"error: {error}: no curve to read, nothing written{check}")
    if run.main_process:
        path = os.path.join(run.fit.output_dir, report_module.LR_FINDER)
        report_module.plot_lr_finder(lrs, losses, suggestion, path)
        print(f"LR finder: {len(lrs)} steps, LR {lrs[0]:.0e} to {lrs[-1]:.1e}. ", end="")
        if suggestion is None:  # a guess off such a curve misleads: say so, and keep LR
            print(f"No clear suggestion: {optim_module.unclear(lrs, losses)}; plot: {path}. Keep "
                  f"--lr {config.optim.lr:g}, or read the plot.")
            return 0
        print(f"Suggested LR: {suggestion:.2g} ({optim_module.LR_RULES[optim_module.LR_RULE][1]}; "
              f"plot: {path}). To train at it: "
              f"{_command_with(argv, {'--find-lr': None, '--lr': f'{suggestion:.2g}'})}")
    return 0


def _command_with(argv: list[str], changes: dict[str, str | None]) -> str:
    """`python main.py` + argv, each flag in changes dropped (None) or set (at the end)."""
    kept, skip = [], False
    for word in argv:
        name = word.split("=")[0]
        if skip and not word.startswith("--"):
            continue
        skip = name in changes
        if not skip:
            kept.append(word)
    kept += [part for name, value in changes.items() if value is not None for part in (name, value)]
    return shlex.join(["python", "main.py", *kept])

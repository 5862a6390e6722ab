"""Exports under precision.channels_last: every saved tensor is contiguous, so safetensors accepts it (a LoRA run's
3×3 lora_A weights and, before diffusers 0.33, a whole student's failed at the very end of a run)."""

from diffusers import ModelMixin

from rglcd.export import export_pipeline, save_lora
from rglcd.lora import STUDENT, add_lora
from rglcd.models import build_student, load_teacher, speed_up


def test_a_channels_last_lora_student_exports(epsilon_teacher_dir, tmp_path):
    unet = add_lora(load_teacher(epsilon_teacher_dir).unet, rank=4)
    speed_up(unet, channels_last=True)
    assert not all(param.is_contiguous() for param in unet.parameters())  # what the run hands to the export
    save_lora(unet, tmp_path / "lora", STUDENT)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_channels_last_whole_student_exports_contiguous_weights(epsilon_teacher_dir, tmp_path, monkeypatch):
    teacher = load_teacher(epsilon_teacher_dir)
    student = build_student(teacher.unet, 8)
    for module in (student, teacher.unet, teacher.vae):
        speed_up(module, channels_last=True)
    assert not all(tensor.is_contiguous() for tensor in teacher.vae.state_dict().values())
    saved = {}
    original = ModelMixin.save_pretrained

    def recording_save(self, *args, **kwargs):  # what diffusers is handed (it makes tensors contiguous only >= 0.33)
        saved[type(self).__name__] = all(tensor.is_contiguous() for tensor in self.state_dict().values())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "save_pretrained", recording_save)
    export_pipeline(tmp_path / "student", student, teacher)
    assert saved == {"UNet2DConditionModel": True, "AutoencoderKL": True}

//! `medtvt demo`: the end-to-end job on the tiny CPU default. It runs every stage of the
//! pipeline that exists in this build and says plainly which stages do not exist yet.

#[derive(clap::Args)]
pub struct DemoArgs {}

pub fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    println!("== medtvt demo ==");
    println!("step 1/1: environment check (medtvt doctor)");
    crate::doctor::run(&crate::doctor::DoctorArgs::default())?;
    println!();
    println!("Not run, because they are not built yet: synthetic MedTVT-QA, PT, SFT, GRPO, evaluation.");
    println!("This demo did only the environment check above; it trained nothing.");
    Ok(())
}

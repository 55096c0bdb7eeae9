//! Commissioning: the inventory, collected and posted. Its end is the appliance's own event:
//! the machine becomes Ready.

use stork_proto::StepState;

use super::Ending;
use crate::appliance::ApplianceClient;
use crate::console::say;
use crate::inventory;
use crate::step::{Failed, Step, at};

pub fn run(client: &ApplianceClient) -> Result<Ending, Failed> {
    client.step_event(
        Step::Commission,
        StepState::Started,
        "collecting the inventory".into(),
    );
    let inv = inventory::collect_and_show();
    let resp = at(Step::Commission, client.commissioned(&inv))?;
    say!(
        Step::Commission,
        "machine {} status {}",
        resp.machine_id,
        resp.status
    );
    Ok(Ending::PowerOff)
}
